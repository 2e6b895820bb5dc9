//! Labels and tag expansion: which model outputs a folder tag switches on.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The NDL model's 11 outputs, in the original order.
pub const NDL_LABELS: [&str; 11] = [
    "graphic",
    "picture",
    "graphic_graph",
    "graphic_map",
    "graphic_illustcolor",
    "picture_indoor",
    "picture_object",
    "picture_person",
    "picture_outdoor",
    "picture_landmark",
    "stamp",
];

/// The original's folder -> labels table.
pub const NDL_FOLDERS: [(&str, &[&str]); 10] = [
    ("graphic_illust", &["graphic"]),
    ("graphic_graph", &["graphic", "graphic_graph"]),
    ("graphic_map", &["graphic", "graphic_map"]),
    ("graphic_illustcolor", &["graphic", "graphic_illustcolor"]),
    ("picture_indoor", &["picture", "picture_indoor"]),
    ("picture_object", &["picture", "picture_object"]),
    ("picture_person", &["picture", "picture_person"]),
    ("picture_outdoor", &["picture", "picture_outdoor"]),
    (
        "picture_landmark",
        &["picture", "picture_outdoor", "picture_landmark"],
    ),
    ("stamp", &["stamp"]),
];

/// Most labels a taxonomy may have. The model's head is one Dense output per label and every
/// image carries one target per label, so memory and time grow with this; 1,000 is ImageNet's
/// label count, far above the NDL's 11, and keeps the worst cases small: targets of 6,405 images
/// take 26 MB, `results.csv` has 4,008 columns, and a taxonomy's implied (child, parent) pairs,
/// which `eval` counts over every image, stay under 500,000.
pub const MAX_LABELS: usize = 1000;
/// Longest label, in bytes (UTF-8).
pub const MAX_LABEL_BYTES: usize = 200;
/// Most folder tags a taxonomy may map.
pub const MAX_FOLDERS: usize = 4096;
/// Longest folder tag, in bytes: a file name.
pub const MAX_FOLDER_BYTES: usize = 255;
/// Largest taxonomy file read.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A label list and the labels each folder tag stands for. Reading one (from a taxonomy file or
/// a checkpoint) stops at [`MAX_LABELS`] labels and [`MAX_FOLDERS`] folders and refuses a folder
/// given twice; [`Taxonomy::validate`] checks the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taxonomy {
    #[serde(deserialize_with = "bounded::labels")]
    pub labels: Vec<String>,
    #[serde(deserialize_with = "bounded::folders")]
    pub folders: BTreeMap<String, Vec<String>>,
}

impl Taxonomy {
    /// The built-in NDL taxonomy.
    pub fn ndl() -> Self {
        Taxonomy {
            labels: NDL_LABELS.iter().map(|s| s.to_string()).collect(),
            folders: NDL_FOLDERS
                .iter()
                .map(|(f, ls)| (f.to_string(), ls.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    /// The label rules, the same for a taxonomy file and a checkpoint: 1 to [`MAX_LABELS`]
    /// labels, each unique, 1 to [`MAX_LABEL_BYTES`] bytes and without control characters; at
    /// most [`MAX_FOLDERS`] folders, each a file name (1 to [`MAX_FOLDER_BYTES`] bytes, no `/`,
    /// no control characters) mapped to labels of the list, each once. The error starts with
    /// the field (`labels ...`, `folders ...`).
    pub fn validate(&self) -> Result<(), String> {
        if self.labels.is_empty() {
            return Err("labels is empty".into());
        }
        if self.labels.len() > MAX_LABELS {
            return Err(too_many_labels(&self.labels.len().to_string()));
        }
        let mut known = HashSet::with_capacity(self.labels.len());
        for label in &self.labels {
            check_name(label, MAX_LABEL_BYTES, "").map_err(|e| format!("labels holds {e}"))?;
            if !known.insert(label.as_str()) {
                return Err(format!("labels lists {} twice", shown(label)));
            }
        }
        if self.folders.len() > MAX_FOLDERS {
            return Err(too_many_folders());
        }
        for (folder, labels) in &self.folders {
            check_name(folder, MAX_FOLDER_BYTES, "/")
                .map_err(|e| format!("folders holds the folder {e}"))?;
            let mut listed = HashSet::with_capacity(labels.len());
            for label in labels {
                if !known.contains(label.as_str()) {
                    return Err(format!(
                        "folders: folder {} maps to {}, which is not in the label list",
                        shown(folder),
                        shown(label)
                    ));
                }
                if !listed.insert(label.as_str()) {
                    return Err(format!(
                        "folders: folder {} lists {} twice",
                        shown(folder),
                        shown(label)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The 0/1 target vector of a folder tag, or `None` for an unknown folder.
    pub fn target(&self, folder: &str) -> Option<Vec<f32>> {
        let on: HashSet<&str> = self
            .folders
            .get(folder)?
            .iter()
            .map(String::as_str)
            .collect();
        Some(
            self.labels
                .iter()
                .map(|l| if on.contains(l.as_str()) { 1.0 } else { 0.0 })
                .collect(),
        )
    }
}

/// A name as an error message shows it: quoted, control characters escaped, at most 60
/// characters.
pub fn shown(name: &str) -> String {
    let mut out = String::from("'");
    for c in name.chars().take(60) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if name.chars().nth(60).is_some() {
        out.push('…');
    }
    out + "'"
}

/// A label or folder name: not empty, at most `max` bytes, no control character nor any of
/// `forbidden`. The error describes the name.
fn check_name(name: &str, max: usize, forbidden: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".into());
    }
    if name.len() > max {
        return Err(format!(
            "{} ({} bytes; at most {max})",
            shown(name),
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || forbidden.contains(*c))
    {
        return Err(format!(
            "{} (it holds {}, which a name may not)",
            shown(name),
            shown(&c.to_string())
        ));
    }
    Ok(())
}

fn too_many_labels(count: &str) -> String {
    format!("labels has {count} entries; at most {MAX_LABELS} (the model has one output per label)")
}

fn too_many_folders() -> String {
    format!("folders maps more than {MAX_FOLDERS} folders")
}

/// Deserializers that stop at the limits instead of allocating whatever a file asks for, and
/// refuse a folder given twice (a plain map keeps the last one silently).
mod bounded {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{Deserializer, Error, MapAccess, SeqAccess, Visitor};

    use super::{shown, too_many_folders, too_many_labels, MAX_FOLDERS, MAX_LABELS};

    struct Labels;

    impl<'de> Visitor<'de> for Labels {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {MAX_LABELS} label names")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(label) = seq.next_element::<String>()? {
                if out.len() == MAX_LABELS {
                    return Err(A::Error::custom(too_many_labels(&format!(
                        "more than {MAX_LABELS}"
                    ))));
                }
                out.push(label);
            }
            Ok(out)
        }
    }

    /// A label list of at most [`MAX_LABELS`] names.
    pub fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(Labels)
    }

    /// A label list as a folder's value.
    struct FolderLabels(Vec<String>);

    impl<'de> serde::Deserialize<'de> for FolderLabels {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            labels(d).map(FolderLabels)
        }
    }

    struct Folders;

    impl<'de> Visitor<'de> for Folders {
        type Value = BTreeMap<String, Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a map of at most {MAX_FOLDERS} folders to label lists")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(folder) = map.next_key::<String>()? {
                if out.contains_key(&folder) {
                    return Err(A::Error::custom(format!(
                        "folders: folder {} is given twice",
                        shown(&folder)
                    )));
                }
                if out.len() == MAX_FOLDERS {
                    return Err(A::Error::custom(too_many_folders()));
                }
                let FolderLabels(labels) = map.next_value()?;
                out.insert(folder, labels);
            }
            Ok(out)
        }
    }

    /// The folder map: at most [`MAX_FOLDERS`] folders, none given twice.
    pub fn folders<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
        d.deserialize_map(Folders)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landmark_expands_to_picture_and_outdoor() {
        let t = Taxonomy::ndl();
        let v = t.target("picture_landmark").unwrap();
        assert_eq!(v, [0., 1., 0., 0., 0., 0., 0., 0., 1., 1., 0.]);
    }

    #[test]
    fn illust_has_no_output_of_its_own() {
        let t = Taxonomy::ndl();
        assert_eq!(
            t.target("graphic_illust").unwrap(),
            [1., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.]
        );
        assert!(!t.labels.iter().any(|l| l == "graphic_illust"));
        assert_eq!(t.target("stamp").unwrap()[10], 1.0);
        assert_eq!(t.target("stamp").unwrap().iter().sum::<f32>(), 1.0);
        assert!(t.target("cats").is_none());
    }

    fn with_labels(labels: &[&str]) -> Taxonomy {
        Taxonomy {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            folders: BTreeMap::from([("f".to_string(), vec![labels[0].to_string()])]),
        }
    }

    #[test]
    fn the_label_rules_name_the_label() {
        let long = "x".repeat(300);
        for (labels, expected) in [
            (vec!["a", ""], "labels holds an empty name".to_string()),
            (vec!["a", "b", "a"], "labels lists 'a' twice".to_string()),
            (
                vec!["a", &long],
                format!(
                    "labels holds '{}…' (300 bytes; at most 200)",
                    "x".repeat(60)
                ),
            ),
            (
                vec!["a", "b\nc"],
                "labels holds 'b\\nc' (it holds '\\n', which a name may not)".to_string(),
            ),
        ] {
            assert_eq!(with_labels(&labels).validate().unwrap_err(), expected);
        }
        let err = Taxonomy {
            labels: vec![],
            folders: BTreeMap::new(),
        }
        .validate()
        .unwrap_err();
        assert_eq!(err, "labels is empty");
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}")).collect();
        let t = Taxonomy {
            labels: many,
            folders: BTreeMap::new(),
        };
        assert!(t
            .validate()
            .unwrap_err()
            .starts_with("labels has 1001 entries; at most 1000"));
    }

    #[test]
    fn weird_but_legal_labels_pass() {
        let t = with_labels(&[
            "=HYPERLINK(\"x\")",
            "@cmd",
            "+1+1",
            "-2+3",
            "a,b",
            "say \"hi\"",
            "é",
        ]);
        t.validate().unwrap();
    }

    #[test]
    fn folder_rules() {
        let mut t = with_labels(&["a", "b"]);
        t.folders.insert("g".into(), vec!["b".into(), "b".into()]);
        assert_eq!(
            t.validate().unwrap_err(),
            "folders: folder 'g' lists 'b' twice"
        );
        t.folders.insert("g".into(), vec!["zz".into()]);
        assert_eq!(
            t.validate().unwrap_err(),
            "folders: folder 'g' maps to 'zz', which is not in the label list"
        );
        t.folders.remove("g");
        t.folders.insert("x/y".into(), vec![]);
        assert!(t
            .validate()
            .unwrap_err()
            .starts_with("folders holds the folder 'x/y'"));
    }

    #[test]
    fn a_folder_given_twice_and_too_many_labels_are_refused_while_reading() {
        let dup = r#"{"labels": ["a", "b"], "folders": {"f": ["a"], "g": ["b"], "f": ["b"]}}"#;
        let err = serde_json::from_str::<Taxonomy>(dup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("folders: folder 'f' is given twice"), "{err}");
        let labels: Vec<String> = (0..MAX_LABELS + 5).map(|i| format!("\"l{i}\"")).collect();
        let big = format!(r#"{{"labels": [{}], "folders": {{}}}}"#, labels.join(","));
        let err = serde_json::from_str::<Taxonomy>(&big)
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels has more than 1000 entries"), "{err}");
        let ok = r#"{"labels": ["a", "b"], "folders": {"f": ["a"], "g": []}}"#;
        let t: Taxonomy = serde_json::from_str(ok).unwrap();
        t.validate().unwrap();
        assert_eq!(t.target("g").unwrap(), [0.0, 0.0]);
    }
}
