//! The Pub/Sub subscription filter language: the portable [`Filter`] compiled to it,
//! a parser for it, and an evaluator over message attributes.
//!
//! The grammar is the one Google documents for subscription filters
//! (<https://cloud.google.com/pubsub/docs/subscription-message-filter>):
//! `attributes.KEY = "v"`, `attributes.KEY != "v"`, `attributes:KEY`,
//! `hasPrefix(attributes.KEY, "p")`, `NOT`/`-`, `AND`, `OR` and parentheses, keys other
//! than letters, digits and underscores written as string literals, at most 256 bytes.
//! The emulator stores filters but ignores them, so the subscription driver parses
//! the stored expression back and applies it in-process: the same rule decides on
//! the emulator and in the cloud.

use std::collections::HashMap;
use std::fmt::Write as _;

use cloudbus_driver::{Error, Filter, Result};

/// Longest filter Pub/Sub accepts, in bytes.
pub const MAX_FILTER_BYTES: usize = 256;

/// A parsed Pub/Sub filter expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// `attributes.KEY = "value"`.
    Equals(String, String),
    /// `attributes.KEY != "value"` (true when the key is absent, as in Pub/Sub).
    NotEquals(String, String),
    /// `attributes:KEY`.
    Has(String),
    /// `hasPrefix(attributes.KEY, "prefix")`.
    HasPrefix(String, String),
    /// `NOT e`.
    Not(Box<Expr>),
    /// `a AND b AND ...`.
    And(Vec<Expr>),
    /// `a OR b OR ...`.
    Or(Vec<Expr>),
}

impl Expr {
    /// Whether a message with these attributes passes the filter.
    pub fn matches(&self, attributes: &HashMap<String, String>) -> bool {
        match self {
            Expr::Equals(k, v) => attributes.get(k).is_some_and(|x| x == v),
            Expr::NotEquals(k, v) => attributes.get(k).is_none_or(|x| x != v),
            Expr::Has(k) => attributes.contains_key(k),
            Expr::HasPrefix(k, p) => attributes.get(k).is_some_and(|x| x.starts_with(p)),
            Expr::Not(e) => !e.matches(attributes),
            Expr::And(es) => es.iter().all(|e| e.matches(attributes)),
            Expr::Or(es) => es.iter().any(|e| e.matches(attributes)),
        }
    }

    /// The expression as Pub/Sub filter text (every compound in parentheses, which
    /// Pub/Sub requires when AND and OR mix).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, false);
        out
    }

    fn write(&self, out: &mut String, nested: bool) {
        match self {
            Expr::Equals(k, v) => {
                let _ = write!(out, "attributes.{} = {}", key(k), literal(v));
            }
            Expr::NotEquals(k, v) => {
                let _ = write!(out, "attributes.{} != {}", key(k), literal(v));
            }
            Expr::Has(k) => {
                let _ = write!(out, "attributes:{}", key(k));
            }
            Expr::HasPrefix(k, p) => {
                let _ = write!(out, "hasPrefix(attributes.{}, {})", key(k), literal(p));
            }
            Expr::Not(e) => {
                out.push_str("NOT ");
                e.write(out, true);
            }
            Expr::And(es) | Expr::Or(es) => {
                let op = if matches!(self, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                if es.len() == 1 {
                    return es[0].write(out, nested);
                }
                if nested {
                    out.push('(');
                }
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        out.push_str(op);
                    }
                    e.write(out, true);
                }
                if nested {
                    out.push(')');
                }
            }
        }
    }
}

fn key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        k.to_owned()
    } else {
        literal(k)
    }
}

fn literal(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Compiles a portable filter over CloudEvent attributes to a Pub/Sub expression over
/// message attributes, where a CloudEvent attribute `a` travels as `{prefix}a`
/// (binary mode). A numeric range has no Pub/Sub form: that is a typed
/// [`Unsupported`](cloudbus_driver::ErrorKind::Unsupported) error.
///
/// ```
/// use cloudbus_driver::Filter;
/// use cloudbus_gcp::filter::compile;
/// let e = compile(&Filter::prefix("type", "com.example."), "ce-").unwrap();
/// assert_eq!(e.to_text(), r#"hasPrefix(attributes."ce-type", "com.example.")"#);
/// ```
pub fn compile(filter: &Filter, prefix: &str) -> Result<Expr> {
    let name = |a: &str| format!("{prefix}{a}");
    Ok(match filter {
        Filter::Equals { attribute, values } => {
            let k = name(attribute);
            if values.is_empty() {
                return Err(Error::invalid(format!(
                    "filter on {attribute:?} accepts no value"
                )));
            }
            any(values
                .iter()
                .map(|v| Expr::Equals(k.clone(), v.clone()))
                .collect())
        }
        Filter::Prefix { attribute, prefix } => Expr::HasPrefix(name(attribute), prefix.clone()),
        Filter::Exists { attribute, present } => {
            let has = Expr::Has(name(attribute));
            if *present {
                has
            } else {
                Expr::Not(Box::new(has))
            }
        }
        Filter::AnythingBut { attribute, values } => {
            let k = name(attribute);
            let mut all = vec![Expr::Has(k.clone())];
            all.extend(values.iter().map(|v| Expr::NotEquals(k.clone(), v.clone())));
            all_of(all)
        }
        Filter::Range { attribute, .. } => {
            return Err(Error::unsupported(format!(
                "Pub/Sub filters have no numeric comparison, so the range on {attribute:?} \
                 cannot be a subscription filter; filter it in the consumer \
                 (ConsumerOptions::filter) instead"
            )));
        }
        Filter::And(fs) => all_of(
            fs.iter()
                .map(|f| compile(f, prefix))
                .collect::<Result<_>>()?,
        ),
        Filter::Or(fs) => any(fs
            .iter()
            .map(|f| compile(f, prefix))
            .collect::<Result<_>>()?),
    })
}

/// `AND` of `es`, a single one as itself.
fn all_of(mut es: Vec<Expr>) -> Expr {
    if es.len() == 1 {
        es.remove(0)
    } else {
        Expr::And(es)
    }
}

/// `OR` of `es`, a single one as itself.
fn any(mut es: Vec<Expr>) -> Expr {
    if es.len() == 1 {
        es.remove(0)
    } else {
        Expr::Or(es)
    }
}

/// Parses Pub/Sub filter text. An empty text is `None` (no filter).
///
/// ```
/// use std::collections::HashMap;
/// use cloudbus_gcp::filter::parse;
/// let e = parse(r#"attributes.kind = "vip" AND NOT attributes:test"#).unwrap().unwrap();
/// let attrs = HashMap::from([("kind".to_string(), "vip".to_string())]);
/// assert!(e.matches(&attrs));
/// ```
pub fn parse(text: &str) -> Result<Option<Expr>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_FILTER_BYTES {
        return Err(Error::invalid(format!(
            "a Pub/Sub filter is at most {MAX_FILTER_BYTES} bytes, this one is {}",
            text.len()
        )));
    }
    let tokens = lex(text)?;
    let mut p = Parser { tokens, at: 0 };
    let e = p.expr()?;
    if p.at != p.tokens.len() {
        return Err(bad(text, "unexpected text after the expression"));
    }
    Ok(Some(e))
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    LParen,
    RParen,
    Comma,
    Dot,
    Colon,
    Eq,
    Ne,
    Minus,
}

fn bad(text: &str, why: &str) -> Error {
    Error::invalid(format!("Pub/Sub filter {text:?}: {why}"))
}

fn lex(text: &str) -> Result<Vec<Tok>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' | '\t' | '\n' | '\r' => {
                chars.next();
            }
            '(' | ')' | ',' | '.' | ':' | '=' | '-' => {
                chars.next();
                out.push(match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    ',' => Tok::Comma,
                    '.' => Tok::Dot,
                    ':' => Tok::Colon,
                    '=' => Tok::Eq,
                    _ => Tok::Minus,
                });
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err(bad(text, "'!' must be followed by '='"));
                }
                out.push(Tok::Ne);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(bad(text, "unterminated string")),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e) => s.push(e),
                            None => return Err(bad(text, "unterminated string")),
                        },
                        Some(x) => s.push(x),
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let mut w = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_ascii_alphanumeric() || x == '_' {
                        w.push(x);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(w));
            }
            other => return Err(bad(text, &format!("unexpected character {other:?}"))),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }
    fn err(&self, why: &str) -> Error {
        Error::invalid(format!(
            "Pub/Sub filter: {why} at token {} ({:?})",
            self.at,
            self.tokens.get(self.at)
        ))
    }
    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }
    fn expect(&mut self, t: Tok) -> Result<()> {
        if self.peek() == Some(&t) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected {t:?}")))
        }
    }

    /// expr := term (AND term)* | term (OR term)*  (mixing needs parentheses)
    fn expr(&mut self) -> Result<Expr> {
        let first = self.term()?;
        let op = if self.is_word("AND") {
            "AND"
        } else if self.is_word("OR") {
            "OR"
        } else {
            return Ok(first);
        };
        let mut all = vec![first];
        while self.is_word(op) {
            self.at += 1;
            all.push(self.term()?);
        }
        if self.is_word("AND") || self.is_word("OR") {
            return Err(self.err("AND and OR must not mix without parentheses"));
        }
        Ok(if op == "AND" {
            Expr::And(all)
        } else {
            Expr::Or(all)
        })
    }

    /// term := (NOT | -) term | '(' expr ')' | hasPrefix(...) | attributes...
    fn term(&mut self) -> Result<Expr> {
        if self.is_word("NOT") || self.peek() == Some(&Tok::Minus) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.term()?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.at += 1;
            let e = self.expr()?;
            self.expect(Tok::RParen)?;
            return Ok(e);
        }
        if self.is_word("hasPrefix") {
            self.at += 1;
            self.expect(Tok::LParen)?;
            self.attributes_word()?;
            self.expect(Tok::Dot)?;
            let k = self.key()?;
            self.expect(Tok::Comma)?;
            let p = self.string()?;
            self.expect(Tok::RParen)?;
            return Ok(Expr::HasPrefix(k, p));
        }
        self.attributes_word()?;
        match self.next() {
            Some(Tok::Colon) => Ok(Expr::Has(self.key()?)),
            Some(Tok::Dot) => {
                let k = self.key()?;
                match self.next() {
                    Some(Tok::Eq) => Ok(Expr::Equals(k, self.string()?)),
                    Some(Tok::Ne) => Ok(Expr::NotEquals(k, self.string()?)),
                    _ => Err(self.err("expected = or !=")),
                }
            }
            _ => Err(self.err("expected '.' or ':' after attributes")),
        }
    }

    fn attributes_word(&mut self) -> Result<()> {
        if self.is_word("attributes") {
            self.at += 1;
            Ok(())
        } else {
            Err(self.err("expected attributes"))
        }
    }
    fn key(&mut self) -> Result<String> {
        match self.next() {
            Some(Tok::Word(w)) | Some(Tok::Str(w)) => Ok(w),
            _ => Err(self.err("expected an attribute key")),
        }
    }
    fn string(&mut self) -> Result<String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(s),
            _ => Err(self.err("expected a string literal")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Each Filter form compiles to the text Google documents for it, and that text
    /// parses back to the same expression.
    #[test]
    fn each_filter_form_compiles_to_documented_syntax() {
        let cases: Vec<(Filter, &str)> = vec![
            (Filter::eq("type", "a.b"), r#"attributes."ce-type" = "a.b""#),
            (
                Filter::one_of("type", ["x", "y"]),
                r#"attributes."ce-type" = "x" OR attributes."ce-type" = "y""#,
            ),
            (
                Filter::prefix("source", "/orders"),
                r#"hasPrefix(attributes."ce-source", "/orders")"#,
            ),
            (Filter::exists("tenant"), r#"attributes:"ce-tenant""#),
            (
                Filter::not_exists("tenant"),
                r#"NOT attributes:"ce-tenant""#,
            ),
            (
                Filter::anything_but("subject", ["test", "dev"]),
                r#"attributes:"ce-subject" AND attributes."ce-subject" != "test" AND attributes."ce-subject" != "dev""#,
            ),
            (
                Filter::and([
                    Filter::prefix("type", "o."),
                    Filter::one_of("tier", ["gold", "vip"]),
                ]),
                r#"hasPrefix(attributes."ce-type", "o.") AND (attributes."ce-tier" = "gold" OR attributes."ce-tier" = "vip")"#,
            ),
            (
                Filter::or([Filter::eq("a", "1"), Filter::not_exists("b")]),
                r#"attributes."ce-a" = "1" OR NOT attributes:"ce-b""#,
            ),
            (
                Filter::eq("type", r#"say "hi"\now"#),
                r#"attributes."ce-type" = "say \"hi\"\\now""#,
            ),
        ];
        for (filter, want) in cases {
            let e = compile(&filter, "ce-").unwrap();
            assert_eq!(e.to_text(), want, "{filter:?}");
            assert_eq!(parse(want).unwrap().as_ref(), Some(&e), "{want}");
        }
        let unprefixed = compile(&Filter::eq("kind", "vip"), "").unwrap();
        assert_eq!(unprefixed.to_text(), r#"attributes.kind = "vip""#);
    }

    #[test]
    fn range_is_a_typed_unsupported_error() {
        let err = compile(&Filter::range("amount", Some(1.0), None), "ce-").unwrap_err();
        assert_eq!(err.kind(), cloudbus_driver::ErrorKind::Unsupported);
    }

    /// The compiled expression decides exactly as the portable evaluator does.
    #[test]
    fn compiled_expression_agrees_with_the_portable_filter() {
        use cloudbus_driver::{AttributesReader, EventBuilder};
        let filters = [
            Filter::eq("type", "t.a"),
            Filter::one_of("type", ["t.a", "t.b"]),
            Filter::prefix("type", "t."),
            Filter::exists("tier"),
            Filter::not_exists("tier"),
            Filter::anything_but("tier", ["gold"]),
            Filter::and([Filter::prefix("type", "t."), Filter::eq("tier", "vip")]),
            Filter::or([Filter::eq("type", "u.x"), Filter::not_exists("tier")]),
        ];
        let events = [
            EventBuilder::new("t.a", "/s").build().unwrap(),
            EventBuilder::new("t.b", "/s")
                .extension("tier", "gold")
                .build()
                .unwrap(),
            EventBuilder::new("t.c", "/s")
                .extension("tier", "vip")
                .build()
                .unwrap(),
            EventBuilder::new("u.x", "/s")
                .extension("tier", "vip")
                .build()
                .unwrap(),
        ];
        let codec = crate::config::codec();
        for f in &filters {
            let e = compile(f, "ce-").unwrap();
            for ev in &events {
                let (raw, _) = codec.encode(ev).unwrap();
                let attrs: HashMap<String, String> = raw.attributes.into_iter().collect();
                assert_eq!(e.matches(&attrs), f.matches(ev), "{f:?} on {}", ev.ty());
            }
        }
    }

    #[test]
    fn parser_accepts_the_documented_forms_and_rejects_the_rest() {
        let a = attrs(&[("k", "v"), ("iana.org/language_tag", "en")]);
        let yes = [
            r#"attributes.k = "v""#,
            r#"attributes:k"#,
            r#"-attributes:missing"#,
            r#"NOT attributes:missing"#,
            r#"attributes.k != "w""#,
            r#"attributes.missing != "w""#,
            r#"hasPrefix(attributes.k, "")"#,
            r#"attributes."iana.org/language_tag" = "en""#,
            r#"(attributes.k = "x" OR attributes:k) AND NOT attributes:z"#,
        ];
        for text in yes {
            let e = parse(text).unwrap().unwrap();
            assert!(e.matches(&a), "{text}");
        }
        let invalid = [
            r#"attributes.k = "v" AND attributes:k OR attributes:z"#,
            r#"attributes.k = v"#,
            r#"attributes.k == "v""#,
            r#"hasPrefix(attributes.k "v")"#,
            r#"attributes.k = "v"#,
            r#"data = "x""#,
        ];
        for text in invalid {
            assert!(parse(text).is_err(), "accepted {text}");
        }
        assert_eq!(parse("  ").unwrap(), None);
        let long = format!(r#"attributes.k = "{}""#, "x".repeat(300));
        assert!(parse(&long).is_err());
    }
}
