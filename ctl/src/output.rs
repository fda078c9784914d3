//! Rendering: a table for people (columns picked per command), JSON or
//! YAML for scripts (every field). Rows arrive as JSON objects, so the
//! three formats cannot disagree on the data.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// `rows` as `format`; `columns` are (header, field) for the table.
pub fn render(format: Format, rows: &[Value], columns: &[(&str, &str)]) -> String {
    match format {
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&Value::Array(rows.to_vec()))
                .unwrap_or_else(|_| "[]".into());
            s.push('\n');
            s
        }
        Format::Yaml => {
            let mut out = String::new();
            if rows.is_empty() {
                out.push_str("[]\n");
            }
            for row in rows {
                yaml_item(&mut out, row, 0);
            }
            out
        }
        Format::Table => table(rows, columns),
    }
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|(_, k)| cell(r.get(*k))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |fields: Vec<&str>| {
        let mut s = fields
            .iter()
            .zip(&widths)
            .map(|(f, w)| format!("{f:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(columns.iter().map(|(h, _)| *h).collect());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A YAML scalar: plain when that reads back as the same string, quoted
/// (JSON string syntax, which YAML accepts) otherwise.
fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let plain = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
                && !s.starts_with(['-', '.', ':'])
                && !matches!(
                    s.as_str(),
                    "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
                )
                && s.parse::<f64>().is_err();
            if plain {
                s.clone()
            } else {
                Value::String(s.clone()).to_string()
            }
        }
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn yaml_item(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) if !map.is_empty() => {
            let mut first = true;
            for (k, val) in map {
                let lead = if first {
                    format!("{pad}- ")
                } else {
                    format!("{pad}  ")
                };
                first = false;
                yaml_field(out, &lead, k, val, indent + 2);
            }
        }
        other => out.push_str(&format!("{pad}- {}\n", yaml_scalar(other))),
    }
}

fn yaml_field(out: &mut String, lead: &str, key: &str, v: &Value, indent: usize) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            out.push_str(&format!("{lead}{key}:\n"));
            let pad = " ".repeat(indent + 2);
            for (k, val) in map {
                yaml_field(out, &pad, k, val, indent + 2);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str(&format!("{lead}{key}:\n"));
            for item in items {
                yaml_item(out, item, indent + 2);
            }
        }
        Value::Object(_) => out.push_str(&format!("{lead}{key}: {{}}\n")),
        Value::Array(_) => out.push_str(&format!("{lead}{key}: []\n")),
        scalar => out.push_str(&format!("{lead}{key}: {}\n", yaml_scalar(scalar))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rows() -> Vec<Value> {
        vec![
            json!({"name": "node-1", "used": 2, "block": "10.244.0.0/24"}),
            json!({"name": "node-10", "used": 0, "block": "10.244.9.0/24"}),
        ]
    }

    #[test]
    fn a_table_aligns_the_picked_columns() {
        let t = render(
            Format::Table,
            &rows(),
            &[("NAME", "name"), ("USED", "used")],
        );
        assert_eq!(t, "NAME     USED\nnode-1   2\nnode-10  0\n");
        assert_eq!(render(Format::Table, &[], &[("NAME", "name")]), "NAME\n");
    }

    #[test]
    fn json_and_yaml_carry_every_field() {
        let j: Value = serde_json::from_str(&render(Format::Json, &rows(), &[])).unwrap();
        assert_eq!(j, Value::Array(rows()));
        let y = render(Format::Yaml, &rows(), &[]);
        assert_eq!(
            y,
            "- block: 10.244.0.0/24\n  name: node-1\n  used: 2\n\
             - block: 10.244.9.0/24\n  name: node-10\n  used: 0\n"
        );
        // Strings YAML would read as something else are quoted.
        let y = render(
            Format::Yaml,
            &[json!({"a": "true", "b": "10", "c": "", "d": "x y", "e": {"f": [1, "no"]}})],
            &[],
        );
        assert_eq!(
            y,
            "- a: \"true\"\n  b: \"10\"\n  c: \"\"\n  d: \"x y\"\n  e:\n    f:\n      - 1\n      - \"no\"\n"
        );
    }
}
