//! Labels and tag expansion: which model outputs a folder tag switches on.

use std::collections::BTreeMap;

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

/// A label list and the labels each folder tag stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taxonomy {
    pub labels: Vec<String>,
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

    /// A label list that is not empty and every folder mapped to labels of that list.
    pub fn validate(&self) -> Result<(), String> {
        if self.labels.is_empty() {
            return Err("the label list is empty".into());
        }
        for (folder, labels) in &self.folders {
            if let Some(bad) = labels.iter().find(|l| !self.labels.contains(l)) {
                return Err(format!(
                    "folder {folder} maps to {bad}, which is not in the label list"
                ));
            }
        }
        Ok(())
    }

    /// The 0/1 target vector of a folder tag, or `None` for an unknown folder.
    pub fn target(&self, folder: &str) -> Option<Vec<f32>> {
        let labels = self.folders.get(folder)?;
        Some(
            self.labels
                .iter()
                .map(|l| if labels.contains(l) { 1.0 } else { 0.0 })
                .collect(),
        )
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
}
