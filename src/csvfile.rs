//! Every CSV file the project writes (`results.csv`, `eval.csv`, `review.csv`, `fetch.csv`) goes
//! through here: records are written by the `csv` crate, quoted only where a field needs it (a
//! comma, a quote, CR or LF), so plain labels and numbers come out exactly as they are; and fields
//! that come from outside (labels, file names, paths, server strings) are neutralised against
//! spreadsheet formula injection the OWASP way: a field beginning with `=`, `+`, `-`, `@`, a tab
//! or CR gets a leading single quote, which spreadsheets show as text instead of evaluating.

use std::borrow::Cow;

use anyhow::{Context, Result};

/// Characters that make a spreadsheet read a field as a formula (OWASP "CSV injection").
const FORMULA_START: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A field from outside (label, file name, path, server string) as it is written: with a leading
/// `'` when it begins with a formula character, unchanged otherwise. Our own numbers never go
/// through this (a negative number stays a number).
pub fn outside(field: &str) -> Cow<'_, str> {
    if field.starts_with(FORMULA_START) {
        Cow::Owned(format!("'{field}"))
    } else {
        Cow::Borrowed(field)
    }
}

/// One CSV record without its line end: the fields as given, quoted only where needed.
pub fn record<I, S>(fields: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .quote_style(csv::QuoteStyle::Necessary)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing into memory cannot fail; the fields are UTF-8 strings, so the bytes are too.
    let written = fields
        .into_iter()
        .try_for_each(|f| writer.write_field(f.as_ref()))
        .and_then(|_| writer.write_record(None::<&[u8]>));
    let bytes = written
        .ok()
        .and_then(|_| writer.into_inner().ok())
        .unwrap_or_default();
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

/// One CSV line: [`record`] and a line feed.
pub fn line<I, S>(fields: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    record(fields) + "\n"
}

/// An optional number as a CSV field: 6 decimals, or empty.
pub fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// The records of a CSV text (the header included), read as Python's `csv` module reads them.
pub fn read_records(text: &str, what: &str) -> Result<Vec<csv::StringRecord>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes())
        .records()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{what}: not a readable CSV file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_fields_are_written_as_they_are() {
        assert_eq!(
            record(["epoch", "0.123456", "", "1e-5", "precision/picture_indoor"]),
            "epoch,0.123456,,1e-5,precision/picture_indoor"
        );
        assert_eq!(line(["a", "-0.5"]), "a,-0.5\n");
    }

    #[test]
    fn commas_quotes_and_line_ends_are_quoted_and_read_back() {
        let hostile = [
            "a,b",
            "say \"hi\"",
            "cr\rhere",
            "lf\nhere",
            "crlf\r\nhere",
            " x ",
        ];
        let text = line(hostile);
        assert_eq!(
            text.lines().next(),
            Some("\"a,b\",\"say \"\"hi\"\"\",\"cr\rhere\",\"lf")
        );
        let records = read_records(&text, "test").unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].iter().collect::<Vec<_>>(), hostile);
    }

    #[test]
    fn formula_starts_are_neutralised_and_other_fields_kept() {
        for (field, written) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("@cmd", "'@cmd"),
            ("+1+1", "'+1+1"),
            ("-2+3", "'-2+3"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("picture", "picture"),
            ("a=b", "a=b"),
            ("", ""),
            ("'quoted", "'quoted"),
        ] {
            assert_eq!(outside(field), written, "{field:?}");
        }
    }
}
