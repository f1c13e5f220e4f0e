//! kubectl's JSONPath templates (`-o jsonpath=...`) and custom columns.
//!
//! A template is text with actions in braces: `{.metadata.name}`, `{.items[*].spec.nodeName}`,
//! `{range .items[*]}{.metadata.name}{"\n"}{end}`, filters such as
//! `{.items[?(@.status.phase=="Running")].metadata.name}`, and quoted literals. Paths are
//! evaluated by `serde_json_path` (RFC 9535, which kubectl's path syntax is a subset of, once
//! rooted at `$`); this module parses the template around them and prints results as
//! kubectl does: strings bare, other values as JSON, several results separated by spaces,
//! and a missing key printed as nothing (kubectl's default `--allow-missing-template-keys`).

use serde_json::Value;
use serde_json_path::JsonPath;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error parsing jsonpath {template}: {why}")]
pub struct TemplateError {
    pub template: String,
    pub why: String,
}

#[derive(Debug)]
enum Node {
    Text(String),
    Path(JsonPath),
    Range(JsonPath, Vec<Node>),
}

/// A parsed template.
#[derive(Debug)]
pub struct Template {
    nodes: Vec<Node>,
}

/// A kubectl path as RFC 9535 JSONPath: rooted at `$`.
fn path(expr: &str, template: &str) -> Result<JsonPath, TemplateError> {
    let e = expr.trim();
    let rooted = if e.starts_with('$') {
        e.to_string()
    } else if e.starts_with('.') || e.starts_with('[') {
        format!("${e}")
    } else {
        format!("$.{e}")
    };
    // `$.` alone (kubectl's `{.}`) is the whole value.
    let rooted = if rooted == "$." { "$".to_string() } else { rooted };
    JsonPath::parse(&rooted)
        .map_err(|err| TemplateError { template: template.to_string(), why: format!("{expr:?}: {err}") })
}

fn literal(s: &str) -> Option<String> {
    let q = s.chars().next()?;
    if !(q == '"' || q == '\'') || s.len() < 2 || !s.ends_with(q) {
        return None;
    }
    let mut out = String::new();
    let mut chars = s[1..s.len() - 1].chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Some(out)
}

/// Splits a template into text and the contents of its `{...}` actions (braces inside quotes
/// and brackets do not end an action).
fn tokens(t: &str) -> Result<Vec<(bool, String)>, TemplateError> {
    let err = |why: &str| TemplateError { template: t.to_string(), why: why.to_string() };
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '{' {
            text.push(c);
            continue;
        }
        if !text.is_empty() {
            out.push((false, std::mem::take(&mut text)));
        }
        let mut action = String::new();
        let (mut quote, mut depth, mut closed) = (None::<char>, 0i32, false);
        for c in chars.by_ref() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '[' | '(') => depth += 1,
                (None, ']' | ')') => depth -= 1,
                (None, '}') if depth == 0 => {
                    closed = true;
                    break;
                }
                _ => {}
            }
            action.push(c);
        }
        if !closed {
            return Err(err("unclosed action"));
        }
        out.push((true, action));
    }
    if !text.is_empty() {
        out.push((false, text));
    }
    Ok(out)
}

/// Appends to the innermost open range (or the top level).
fn push(stack: &mut [(Option<JsonPath>, Vec<Node>)], node: Node) {
    if let Some((_, nodes)) = stack.last_mut() {
        nodes.push(node);
    }
}

impl Template {
    pub fn parse(t: &str) -> Result<Template, TemplateError> {
        let err = |why: String| TemplateError { template: t.to_string(), why };
        // A stack of open ranges; the bottom holds the template's top level.
        let mut stack: Vec<(Option<JsonPath>, Vec<Node>)> = vec![(None, Vec::new())];
        for (action, s) in tokens(t)? {
            if !action {
                push(&mut stack, Node::Text(s));
                continue;
            }
            let a = s.trim();
            if let Some(rest) = a.strip_prefix("range ") {
                stack.push((Some(path(rest, t)?), Vec::new()));
            } else if a == "end" {
                if stack.len() < 2 {
                    return Err(err("{end} without {range}".into()));
                }
                let Some((Some(p), body)) = stack.pop() else {
                    return Err(err("{end} without {range}".into()));
                };
                push(&mut stack, Node::Range(p, body));
            } else if let Some(text) = literal(a) {
                push(&mut stack, Node::Text(text));
            } else if a.is_empty() {
                return Err(err("empty action {}".into()));
            } else {
                let p = path(a, t)?;
                push(&mut stack, Node::Path(p));
            }
        }
        if stack.len() != 1 {
            return Err(err("{range} without {end}".into()));
        }
        Ok(Template { nodes: stack.pop().map(|(_, n)| n).unwrap_or_default() })
    }

    /// The template applied to `data`.
    pub fn render(&self, data: &Value) -> String {
        let mut out = String::new();
        render(&self.nodes, data, &mut out);
        out
    }
}

/// How kubectl prints one value: strings bare, everything else as JSON.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(nodes: &[Node], data: &Value, out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Path(p) => {
                let values: Vec<String> = p.query(data).all().into_iter().map(show).collect();
                out.push_str(&values.join(" "));
            }
            Node::Range(p, body) => {
                for item in p.query(data).all() {
                    render(body, item, out);
                }
            }
        }
    }
}

/// One column of `-o custom-columns`.
#[derive(Debug)]
pub struct Column {
    pub header: String,
    template: Template,
}

/// Parses `HEADER:.path,HEADER2:.other` (kubectl's syntax; a path may omit its braces and
/// its leading dot).
pub fn columns(spec: &str) -> Result<Vec<Column>, TemplateError> {
    let err = |why: String| TemplateError { template: spec.to_string(), why };
    let mut out = Vec::new();
    for part in split_columns(spec) {
        let (header, expr) = part.split_once(':').ok_or_else(|| err(format!("{part:?} is not HEADER:JSONPATH")))?;
        let expr = expr.trim();
        let expr = expr.strip_prefix('{').and_then(|e| e.strip_suffix('}')).unwrap_or(expr);
        let template = Template { nodes: vec![Node::Path(path(expr, spec)?)] };
        out.push(Column { header: header.trim().to_string(), template });
    }
    if out.is_empty() {
        return Err(err("no columns".into()));
    }
    Ok(out)
}

/// Splits on commas outside brackets and quotes (a filter may hold commas).
fn split_columns(spec: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None::<char>);
    for c in spec.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '(' | '{') => depth += 1,
            (None, ']' | ')' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// A column's value for one object: its results joined by commas, or `<none>`.
pub fn cell(column: &Column, object: &Value) -> String {
    let Some(Node::Path(p)) = column.template.nodes.first() else { return "<none>".into() };
    let values: Vec<String> = p.query(object).all().into_iter().map(show).collect();
    if values.is_empty() {
        "<none>".into()
    } else {
        values.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> Value {
        json!({"apiVersion": "v1", "kind": "List", "items": [
            {"metadata": {"name": "a", "labels": {"app": "web"}}, "spec": {"nodeName": "n1", "replicas": 2},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "b"}, "spec": {"nodeName": "n2"},
             "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}}
        ]})
    }

    fn run(t: &str, data: &Value) -> String {
        Template::parse(t).unwrap().render(data)
    }

    #[test]
    fn templates_print_as_kubectl_does() {
        let l = list();
        assert_eq!(run("{.items[*].metadata.name}", &l), "a b");
        assert_eq!(run("{.items[0].spec.replicas}", &l), "2");
        assert_eq!(
            run("{range .items[*]}{.metadata.name}{\"\\t\"}{.spec.nodeName}{\"\\n\"}{end}", &l),
            "a\tn1\nb\tn2\n"
        );
        assert_eq!(run("{.items[?(@.status.phase==\"Running\")].metadata.name}", &l), "a");
        assert_eq!(run("names: {.items[*].metadata.name}!", &l), "names: a b!");
        assert_eq!(run("{.items[0].metadata.labels}", &l), "{\"app\":\"web\"}");
        assert_eq!(run("{.items[*].metadata.missing}", &l), "", "missing keys print nothing");
        assert_eq!(run("{$.kind}", &l), "List");
        assert_eq!(run("{..phase}", &l), "Running Pending");
        assert_eq!(run("{.items[-1:].metadata.name}", &l), "b");
        assert_eq!(
            run(
                "{range .items[*]}{.metadata.name}:{range .status.conditions[*]}{.type}={.status};{end}{\"\\n\"}{end}",
                &l
            ),
            "a:Ready=True;\nb:Ready=False;\n"
        );
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert!(Template::parse("{.items[*}").unwrap_err().why.contains("unclosed"));
        assert!(Template::parse("{range .items[*]}x").unwrap_err().why.contains("without {end}"));
        assert!(Template::parse("{end}").unwrap_err().why.contains("without {range}"));
        assert!(Template::parse("{.items[?(@.a==)]}").is_err());
    }

    #[test]
    fn custom_columns_take_kubectl_specs() {
        let cols = columns("NAME:.metadata.name,NODE:{.spec.nodeName},APP:metadata.labels.app").unwrap();
        let headers: Vec<&str> = cols.iter().map(|c| c.header.as_str()).collect();
        assert_eq!(headers, ["NAME", "NODE", "APP"]);
        let items = list()["items"].clone();
        let row = |i: usize| cols.iter().map(|c| cell(c, &items[i])).collect::<Vec<_>>();
        assert_eq!(row(0), ["a", "n1", "web"]);
        assert_eq!(row(1), ["b", "n2", "<none>"]);
        let c = columns("READY:.status.conditions[?(@.type==\"Ready\")].status").unwrap();
        assert_eq!(cell(&c[0], &items[1]), "False");
        assert!(columns("NAME").is_err());
    }
}
