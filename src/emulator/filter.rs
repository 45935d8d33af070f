//! Subscription rules as ASB applies them when a message is sent to a topic: a message
//! is copied to a subscription when ANY of its rules' filters matches (a subscription
//! without rules has `$Default`, the true filter).
//!
//! - **Correlation filter**: every property the filter sets must equal the message's
//!   (a logical AND); strings compare case-sensitively (ordinal); `Label` is the AMQP
//!   `subject`, `SessionId` the `group-id`, `ReplyToSessionId` the `reply-to-group-id`;
//!   user `Properties` compare by value with the message's application properties
//!   (numbers numerically, so `5` matches an int, long or double 5).
//! - **SQL filter**: the subset in [`parse_sql`]; anything else is refused when the
//!   emulator starts, with the unsupported part named, never evaluated differently.

use std::fmt;

use fe2o3_amqp::types::messaging::MessageId;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};

use super::message::StoredMessage;

/// One rule of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub filter: Filter,
}

impl Rule {
    /// ASB's default rule: `$Default`, the true filter.
    pub fn default_rule() -> Self {
        Rule {
            name: "$Default".into(),
            filter: Filter::True,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    True,
    False,
    Correlation(CorrelationFilter),
    Sql(SqlFilter),
}

impl Filter {
    pub fn matches(&self, msg: &StoredMessage) -> bool {
        match self {
            Filter::True => true,
            Filter::False => false,
            Filter::Correlation(c) => c.matches(msg),
            Filter::Sql(s) => s.pred.eval(msg) == Some(true),
        }
    }
}

/// Does any rule match? (No rules: nothing matches; callers give `$Default` instead.)
pub fn any_matches(rules: &[Rule], msg: &StoredMessage) -> bool {
    rules.iter().any(|r| r.filter.matches(msg))
}

/// A literal: a Config.json property value or an SQL constant.
#[derive(Debug, Clone)]
pub enum Lit {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl PartialEq for Lit {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Lit::Str(a), Lit::Str(b)) => a == b,
            (Lit::Int(a), Lit::Int(b)) => a == b,
            (Lit::Float(a), Lit::Float(b)) => a.to_bits() == b.to_bits(),
            (Lit::Bool(a), Lit::Bool(b)) => a == b,
            _ => false,
        }
    }
}
impl Eq for Lit {}

impl fmt::Display for Lit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lit::Str(s) => write!(f, "'{s}'"),
            Lit::Int(i) => write!(f, "{i}"),
            Lit::Float(x) => write!(f, "{x}"),
            Lit::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A correlation filter: the set fields must all match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorrelationFilter {
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// `Label` in Config.json: the AMQP subject.
    pub subject: Option<String>,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub session_id: Option<String>,
    pub to: Option<String>,
    /// User (application) properties, compared by value.
    pub properties: Vec<(String, Lit)>,
}

impl CorrelationFilter {
    pub fn is_empty(&self) -> bool {
        *self == CorrelationFilter::default()
    }

    pub fn matches(&self, msg: &StoredMessage) -> bool {
        let sys = [
            (&self.content_type, SysProp::ContentType),
            (&self.correlation_id, SysProp::CorrelationId),
            (&self.subject, SysProp::Label),
            (&self.message_id, SysProp::MessageId),
            (&self.reply_to, SysProp::ReplyTo),
            (&self.reply_to_session_id, SysProp::ReplyToSessionId),
            (&self.session_id, SysProp::SessionId),
            (&self.to, SysProp::To),
        ];
        for (want, prop) in sys {
            if let Some(want) = want {
                match prop.get(msg) {
                    Some(Lit::Str(have)) if have == *want => {}
                    _ => return false,
                }
            }
        }
        self.properties.iter().all(|(name, want)| {
            user_prop(msg, name).is_some_and(|have| compare(&have, want) == Some(Ordering::Equal))
        })
    }
}

/// The system properties the emulator's SQL filters know (`sys.NAME`, case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysProp {
    MessageId,
    CorrelationId,
    To,
    ReplyTo,
    Label,
    ContentType,
    SessionId,
    ReplyToSessionId,
    SequenceNumber,
}

impl SysProp {
    const ALL: [(&'static str, SysProp); 10] = [
        ("MessageId", SysProp::MessageId),
        ("CorrelationId", SysProp::CorrelationId),
        ("To", SysProp::To),
        ("ReplyTo", SysProp::ReplyTo),
        ("Label", SysProp::Label),
        ("Subject", SysProp::Label),
        ("ContentType", SysProp::ContentType),
        ("SessionId", SysProp::SessionId),
        ("ReplyToSessionId", SysProp::ReplyToSessionId),
        ("SequenceNumber", SysProp::SequenceNumber),
    ];

    fn parse(name: &str) -> Option<SysProp> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, p)| *p)
    }

    fn get(self, msg: &StoredMessage) -> Option<Lit> {
        let p = msg.properties.as_ref();
        let s = |v: Option<&String>| v.map(|s| Lit::Str(s.clone()));
        match self {
            SysProp::MessageId => p.and_then(|p| p.message_id.as_ref()).map(id_lit),
            SysProp::CorrelationId => p.and_then(|p| p.correlation_id.as_ref()).map(id_lit),
            SysProp::To => s(p.and_then(|p| p.to.as_ref())),
            SysProp::ReplyTo => s(p.and_then(|p| p.reply_to.as_ref())),
            SysProp::Label => s(p.and_then(|p| p.subject.as_ref())),
            SysProp::ContentType => p
                .and_then(|p| p.content_type.as_ref())
                .map(|c| Lit::Str(c.0.clone())),
            SysProp::SessionId => s(p.and_then(|p| p.group_id.as_ref())),
            SysProp::ReplyToSessionId => s(p.and_then(|p| p.reply_to_group_id.as_ref())),
            SysProp::SequenceNumber => msg.message_annotations.as_ref().and_then(|a| {
                a.0.iter().find_map(|(k, v)| match (k, v) {
                    (
                        fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s),
                        Value::Long(n),
                    ) if s.0 == "x-opt-sequence-number" => Some(Lit::Int(*n)),
                    _ => None,
                })
            }),
        }
    }
}

/// Message ids as .NET shows them: strings as they are, numbers in decimal, UUIDs
/// hyphenated, binary in hex.
fn id_lit(id: &MessageId) -> Lit {
    Lit::Str(crate::source::decode::message_id_string(id))
}

fn user_prop(msg: &StoredMessage, name: &str) -> Option<Lit> {
    let v = msg.application_properties.as_ref()?.get(name)?;
    Some(match v {
        SimpleValue::String(s) => Lit::Str(s.clone()),
        SimpleValue::Symbol(s) => Lit::Str(s.0.clone()),
        SimpleValue::Bool(b) => Lit::Bool(*b),
        SimpleValue::Ubyte(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Ushort(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Uint(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Ulong(n) => i64::try_from(*n)
            .map(Lit::Int)
            .unwrap_or(Lit::Float(*n as f64)),
        SimpleValue::Byte(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Short(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Int(n) => Lit::Int(i64::from(*n)),
        SimpleValue::Long(n) => Lit::Int(*n),
        SimpleValue::Float(x) => Lit::Float(f64::from(x.into_inner())),
        SimpleValue::Double(x) => Lit::Float(x.into_inner()),
        // Null, timestamps, uuids, binary, decimals, chars: not comparable here.
        _ => return None,
    })
}

use std::cmp::Ordering;

/// Compare two values of compatible types (strings with strings, numbers with numbers,
/// booleans with booleans); `None` when they cannot be compared (SQL: unknown).
fn compare(a: &Lit, b: &Lit) -> Option<Ordering> {
    match (a, b) {
        (Lit::Str(a), Lit::Str(b)) => Some(a.cmp(b)),
        (Lit::Bool(a), Lit::Bool(b)) => Some(a.cmp(b)),
        (Lit::Int(a), Lit::Int(b)) => Some(a.cmp(b)),
        (Lit::Int(a), Lit::Float(b)) => (*a as f64).partial_cmp(b),
        (Lit::Float(a), Lit::Int(b)) => a.partial_cmp(&(*b as f64)),
        (Lit::Float(a), Lit::Float(b)) => a.partial_cmp(b),
        _ => None,
    }
}

// ------------------------------------------------------------------------ SQL

/// A parsed SQL filter (the text is kept for messages and equality).
#[derive(Debug, Clone)]
pub struct SqlFilter {
    pub text: String,
    pred: Pred,
}

impl PartialEq for SqlFilter {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for SqlFilter {}

#[derive(Debug, Clone)]
enum Operand {
    Lit(Lit),
    Null,
    Sys(SysProp),
    User(String),
}

impl Operand {
    /// `None`: null or a missing property (SQL's unknown).
    fn value(&self, msg: &StoredMessage) -> Option<Lit> {
        match self {
            Operand::Lit(l) => Some(l.clone()),
            Operand::Null => None,
            Operand::Sys(p) => p.get(msg),
            Operand::User(n) => user_prop(msg, n),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
enum Pred {
    Const(bool),
    Not(Box<Pred>),
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    Cmp(Operand, CmpOp, Operand),
    IsNull(Operand, bool),
    In(Operand, Vec<Operand>, bool),
    Like(Operand, Vec<LikeTok>, bool),
    Exists(Operand),
}

#[derive(Debug, Clone, PartialEq)]
enum LikeTok {
    Char(char),
    /// `_`
    One,
    /// `%`
    Any,
}

impl Pred {
    /// Three-valued logic: `None` is unknown (a missing user property, a null).
    fn eval(&self, msg: &StoredMessage) -> Option<bool> {
        match self {
            Pred::Const(b) => Some(*b),
            Pred::Not(p) => p.eval(msg).map(|b| !b),
            Pred::And(a, b) => match (a.eval(msg), b.eval(msg)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Pred::Or(a, b) => match (a.eval(msg), b.eval(msg)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Pred::Cmp(a, op, b) => {
                let o = compare(&a.value(msg)?, &b.value(msg)?)?;
                Some(match op {
                    CmpOp::Eq => o == Ordering::Equal,
                    CmpOp::Ne => o != Ordering::Equal,
                    CmpOp::Lt => o == Ordering::Less,
                    CmpOp::Le => o != Ordering::Greater,
                    CmpOp::Gt => o == Ordering::Greater,
                    CmpOp::Ge => o != Ordering::Less,
                })
            }
            Pred::IsNull(a, negated) => Some(a.value(msg).is_none() != *negated),
            Pred::In(a, list, negated) => {
                let v = a.value(msg)?;
                let mut unknown = false;
                for item in list {
                    match item.value(msg).and_then(|i| compare(&v, &i)) {
                        Some(Ordering::Equal) => return Some(!*negated),
                        Some(_) => {}
                        None => unknown = true,
                    }
                }
                if unknown { None } else { Some(*negated) }
            }
            Pred::Like(a, pattern, negated) => match a.value(msg)? {
                Lit::Str(s) => {
                    let chars: Vec<char> = s.chars().collect();
                    Some(like(&chars, pattern) != *negated)
                }
                _ => None,
            },
            Pred::Exists(a) => Some(a.value(msg).is_some()),
        }
    }
}

fn like(s: &[char], p: &[LikeTok]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((LikeTok::Any, rest)) => (0..=s.len()).any(|i| like(&s[i..], rest)),
        Some((LikeTok::One, rest)) => !s.is_empty() && like(&s[1..], rest),
        Some((LikeTok::Char(c), rest)) => s.first() == Some(c) && like(&s[1..], rest),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A word: keyword or identifier (possibly `scope.name`), as written.
    Word(String),
    /// `[name]`, optionally after `sys.` / `user.` (scope kept in the first field).
    Bracketed(Option<String>, String),
    Str(String),
    Int(i64),
    Float(f64),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

/// Why an SQL filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SqlError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError(msg.into()))
}

fn lex(text: &str) -> Result<Vec<Tok>, SqlError> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err("a string literal is not closed (missing ')"),
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                            s.push('\'');
                            i += 2
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(c) => {
                            s.push(*c);
                            i += 1
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            '0'..='9' | '.' if c != '.' || chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let s: String = chars[start..i].iter().collect();
                if s.contains('.') {
                    match s.parse() {
                        Ok(x) => out.push(Tok::Float(x)),
                        Err(_) => return err(format!("'{s}' is not a number")),
                    }
                } else {
                    match s.parse() {
                        Ok(n) => out.push(Tok::Int(n)),
                        Err(_) => return err(format!("'{s}' is out of range")),
                    }
                }
            }
            '[' => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .ok_or_else(|| SqlError("a [bracketed] name is not closed".into()))?;
                let name: String = chars[i + 1..i + end].iter().collect();
                out.push(Tok::Bracketed(None, name));
                i += end + 1;
            }
            _ if c.is_alphabetic() || c == '_' || c == '@' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '@')
                {
                    i += 1;
                }
                let mut word: String = chars[start..i].iter().collect();
                // scope.name or scope.[name]
                if chars.get(i) == Some(&'.')
                    && (word.eq_ignore_ascii_case("sys") || word.eq_ignore_ascii_case("user"))
                {
                    if chars.get(i + 1) == Some(&'[') {
                        let rest = &chars[i + 2..];
                        let end = rest
                            .iter()
                            .position(|c| *c == ']')
                            .ok_or_else(|| SqlError("a [bracketed] name is not closed".into()))?;
                        let name: String = rest[..end].iter().collect();
                        out.push(Tok::Bracketed(Some(word), name));
                        i += 2 + end + 1;
                        continue;
                    }
                    let nstart = i + 1;
                    let mut j = nstart;
                    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    let name: String = chars[nstart..j].iter().collect();
                    word = format!("{word}.{name}");
                    i = j;
                }
                out.push(Tok::Word(word));
            }
            _ => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                let op = match two.as_str() {
                    "<>" => Some("<>"),
                    "!=" => Some("!="),
                    "<=" => Some("<="),
                    ">=" => Some(">="),
                    _ => None,
                };
                if let Some(op) = op {
                    out.push(Tok::Op(op));
                    i += 2;
                    continue;
                }
                let op = match c {
                    '=' => "=",
                    '<' => "<",
                    '>' => ">",
                    '+' => "+",
                    '-' => "-",
                    '*' => "*",
                    '/' => "/",
                    '%' => "%",
                    _ => return err(format!("unexpected character '{c}'")),
                };
                out.push(Tok::Op(op));
                i += 1;
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
}

const RESERVED: [&str; 13] = [
    "AND", "OR", "NOT", "IS", "NULL", "IN", "LIKE", "ESCAPE", "EXISTS", "TRUE", "FALSE", "SET",
    "REMOVE",
];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        if is_kw(self.peek(), kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, t: Tok, what: &str) -> Result<(), SqlError> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            Some(x) => err(format!("expected {what}, found {}", show(&x))),
            None => err(format!("expected {what} at the end")),
        }
    }

    fn or(&mut self) -> Result<Pred, SqlError> {
        let mut p = self.and()?;
        while self.eat_kw("OR") {
            p = Pred::Or(Box::new(p), Box::new(self.and()?));
        }
        Ok(p)
    }
    fn and(&mut self) -> Result<Pred, SqlError> {
        let mut p = self.not()?;
        while self.eat_kw("AND") {
            p = Pred::And(Box::new(p), Box::new(self.not()?));
        }
        Ok(p)
    }
    fn not(&mut self) -> Result<Pred, SqlError> {
        if self.eat_kw("NOT") {
            return Ok(Pred::Not(Box::new(self.not()?)));
        }
        self.primary()
    }
    fn primary(&mut self) -> Result<Pred, SqlError> {
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let p = self.or()?;
            self.expect(Tok::RParen, "')'")?;
            return Ok(p);
        }
        if self.eat_kw("EXISTS") {
            self.expect(Tok::LParen, "'(' after EXISTS")?;
            let o = self.operand()?;
            if !matches!(o, Operand::Sys(_) | Operand::User(_)) {
                return err("EXISTS takes a property");
            }
            self.expect(Tok::RParen, "')'")?;
            return Ok(Pred::Exists(o));
        }
        let left = self.operand()?;
        let negated = self.eat_kw("NOT");
        match self.peek().cloned() {
            Some(Tok::Op(op)) if !negated => {
                let op = match op {
                    "=" => CmpOp::Eq,
                    "<>" | "!=" => CmpOp::Ne,
                    "<" => CmpOp::Lt,
                    "<=" => CmpOp::Le,
                    ">" => CmpOp::Gt,
                    ">=" => CmpOp::Ge,
                    other => return arithmetic(other),
                };
                self.pos += 1;
                let right = self.operand()?;
                Ok(Pred::Cmp(left, op, right))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("IS") && !negated => {
                self.pos += 1;
                let neg = self.eat_kw("NOT");
                if !self.eat_kw("NULL") {
                    return err("expected NULL after IS [NOT]");
                }
                Ok(Pred::IsNull(left, neg))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("IN") => {
                self.pos += 1;
                self.expect(Tok::LParen, "'(' after IN")?;
                let mut list = vec![self.operand()?];
                while self.peek() == Some(&Tok::Comma) {
                    self.pos += 1;
                    list.push(self.operand()?);
                }
                self.expect(Tok::RParen, "')' closing the IN list")?;
                Ok(Pred::In(left, list, negated))
            }
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("LIKE") => {
                self.pos += 1;
                let Some(Tok::Str(pattern)) = self.next() else {
                    return err("LIKE takes a string pattern such as 'abc%'");
                };
                let escape = if self.eat_kw("ESCAPE") {
                    match self.next() {
                        Some(Tok::Str(e)) if e.chars().count() == 1 => e.chars().next(),
                        _ => return err("ESCAPE takes one character in quotes"),
                    }
                } else {
                    None
                };
                Ok(Pred::Like(left, like_pattern(&pattern, escape)?, negated))
            }
            _ if !negated => match left {
                Operand::Lit(Lit::Bool(b)) => Ok(Pred::Const(b)),
                _ => err("expected a comparison (=, <>, <, >, IS NULL, IN, LIKE)"),
            },
            _ => err("expected IN or LIKE after NOT"),
        }
    }

    fn operand(&mut self) -> Result<Operand, SqlError> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Operand::Lit(Lit::Str(s))),
            Some(Tok::Int(n)) => Ok(Operand::Lit(Lit::Int(n))),
            Some(Tok::Float(x)) => Ok(Operand::Lit(Lit::Float(x))),
            Some(Tok::Op("-")) => match self.next() {
                Some(Tok::Int(n)) => Ok(Operand::Lit(Lit::Int(-n))),
                Some(Tok::Float(x)) => Ok(Operand::Lit(Lit::Float(-x))),
                _ => arithmetic("-"),
            },
            Some(Tok::Bracketed(scope, name)) => property(scope.as_deref(), &name),
            Some(Tok::Word(w)) => {
                if w.eq_ignore_ascii_case("TRUE") {
                    return Ok(Operand::Lit(Lit::Bool(true)));
                }
                if w.eq_ignore_ascii_case("FALSE") {
                    return Ok(Operand::Lit(Lit::Bool(false)));
                }
                if w.eq_ignore_ascii_case("NULL") {
                    return Ok(Operand::Null);
                }
                if w.starts_with('@') {
                    return err(format!(
                        "parameters ({w}) are not supported by the emulator"
                    ));
                }
                if self.peek() == Some(&Tok::LParen) {
                    return err(format!(
                        "functions ({w}(...)) are not supported by the emulator"
                    ));
                }
                if RESERVED.iter().any(|k| k.eq_ignore_ascii_case(&w)) {
                    return err(format!("expected a property or a constant, found {w}"));
                }
                match w.split_once('.') {
                    Some((scope, name)) => property(Some(scope), name),
                    None => property(None, &w),
                }
            }
            Some(t) => err(format!(
                "expected a property or a constant, found {}",
                show(&t)
            )),
            None => err("expected a property or a constant at the end"),
        }
    }
}

fn arithmetic<T>(op: &str) -> Result<T, SqlError> {
    err(format!(
        "arithmetic ('{op}') is not supported by the emulator"
    ))
}

fn property(scope: Option<&str>, name: &str) -> Result<Operand, SqlError> {
    if name.is_empty() {
        return err("a property name is empty");
    }
    match scope {
        Some(s) if s.eq_ignore_ascii_case("sys") => match SysProp::parse(name) {
            Some(p) => Ok(Operand::Sys(p)),
            None => err(format!(
                "sys.{name} is not a system property the emulator supports (supported: {})",
                SysProp::ALL
                    .iter()
                    .map(|(n, _)| format!("sys.{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
        _ => Ok(Operand::User(name.to_string())),
    }
}

fn like_pattern(p: &str, escape: Option<char>) -> Result<Vec<LikeTok>, SqlError> {
    let mut out = Vec::new();
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if Some(c) == escape {
            match chars.next() {
                Some(n) => out.push(LikeTok::Char(n)),
                None => return err("the LIKE pattern ends with its escape character"),
            }
        } else if c == '%' {
            out.push(LikeTok::Any);
        } else if c == '_' {
            out.push(LikeTok::One);
        } else {
            out.push(LikeTok::Char(c));
        }
    }
    Ok(out)
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Word(w) => w.clone(),
        Tok::Bracketed(Some(s), n) => format!("{s}.[{n}]"),
        Tok::Bracketed(None, n) => format!("[{n}]"),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Int(n) => n.to_string(),
        Tok::Float(x) => x.to_string(),
        Tok::Op(o) => format!("'{o}'"),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
    }
}

/// Parse an SQL filter expression. The supported subset of ASB's SQL-92 filter syntax:
/// - constants `TRUE`, `FALSE`, `NULL`, integers, decimals, `'strings'` (`''` escapes a
///   quote); `1=1` and `1=0` work as comparisons;
/// - properties `name`, `user.name`, `[any name]`, `user.[any name]`, and the system
///   properties `sys.MessageId`, `CorrelationId`, `To`, `ReplyTo`, `Label` (or
///   `Subject`), `ContentType`, `SessionId`, `ReplyToSessionId`, `SequenceNumber`;
/// - `= <> != < <= > >=`, `IS [NOT] NULL`, `[NOT] IN (…)`, `[NOT] LIKE '…' [ESCAPE '…']`,
///   `EXISTS(property)`, `NOT`, `AND`, `OR`, parentheses; SQL's three-valued logic (a
///   missing user property is unknown, and unknown never matches).
///
/// Refused, with the part named: arithmetic, functions (`newid()`, `property()`),
/// `@parameters`, other system properties.
pub fn parse_sql(text: &str) -> Result<SqlFilter, SqlError> {
    let toks = lex(text)?;
    if toks.is_empty() {
        return err("the expression is empty");
    }
    let mut p = Parser { toks, pos: 0 };
    let pred = p.or()?;
    if let Some(t) = p.peek() {
        if let Tok::Op(op @ ("+" | "-" | "*" | "/" | "%")) = t {
            return arithmetic(op);
        }
        return err(format!("unexpected {} after a complete condition", show(t)));
    }
    Ok(SqlFilter {
        text: text.to_string(),
        pred,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Properties};

    fn msg(subject: &str, props: &[(&str, SimpleValue)]) -> StoredMessage {
        let mut ap = ApplicationProperties::builder();
        for (k, v) in props {
            ap = ap.insert(k.to_string(), v.clone());
        }
        Message::builder()
            .properties(
                Properties::builder()
                    .subject(subject.to_string())
                    .message_id("m-1".to_string())
                    .correlation_id(42u64)
                    .content_type("application/json")
                    .build(),
            )
            .application_properties(ap.build())
            .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
                Value::Null,
            )))
            .build()
    }

    fn sql(text: &str, m: &StoredMessage) -> bool {
        Filter::Sql(parse_sql(text).unwrap_or_else(|e| panic!("{text}: {e}"))).matches(m)
    }

    #[test]
    fn sql_subset_evaluates_like_asb() {
        let m = msg(
            "temp",
            &[
                ("line", SimpleValue::String("line1".into())),
                ("n", SimpleValue::Int(5)),
                ("x", SimpleValue::Double(2.5.into())),
                ("ok", SimpleValue::Bool(true)),
            ],
        );
        for yes in [
            "1=1",
            "TRUE",
            "true",
            "line = 'line1'",
            "user.line = 'line1'",
            "[line] = 'line1'",
            "sys.Label = 'temp'",
            "sys.label = 'temp' AND n >= 5",
            "sys.MessageId = 'm-1'",
            "sys.CorrelationId = '42'",
            "sys.ContentType = 'application/json'",
            "n = 5.0 AND x > 2 AND x < 3",
            "n <> 4 AND n != 6",
            "ok = TRUE",
            "missing IS NULL",
            "line IS NOT NULL",
            "EXISTS(line) AND NOT EXISTS(missing)",
            "line IN ('a', 'line1')",
            "n NOT IN (1, 2)",
            "line LIKE 'line%'",
            "line LIKE 'lin_1'",
            "sys.Label NOT LIKE 'hum%'",
            "missing = 1 OR line = 'line1'",
            "NOT (missing = 1 AND line = 'x')",
            "(n = 5)",
            "n > -1 AND x > -2.5",
        ] {
            assert!(sql(yes, &m), "{yes} should match");
        }
        for no in [
            "1=0",
            "FALSE",
            "line = 'LINE1'",
            "missing = 1",
            "NOT (missing = 1)",
            "missing <> 1",
            "line IN ('a', 'b')",
            "missing IN (1)",
            "line LIKE 'x%'",
            "line = 5",
            "sys.To = 'x'",
            "sys.Label = 'temp' AND missing = 'x'",
        ] {
            assert!(!sql(no, &m), "{no} should not match");
        }
        let m2 = msg("a_b", &[]);
        assert!(sql(r"sys.Label LIKE 'a\_b' ESCAPE '\'", &m2));
        assert!(!sql(r"sys.Label LIKE 'a\_c' ESCAPE '\'", &m2));
    }

    #[test]
    fn unsupported_sql_is_refused_naming_the_part() {
        for (text, part) in [
            ("n + 1 = 2", "arithmetic ('+')"),
            ("n = 1 * 2", "arithmetic ('*')"),
            ("newid() = 'x'", "functions (newid(...))"),
            ("@p = 1", "parameters (@p)"),
            (
                "sys.DeliveryCount > 1",
                "sys.DeliveryCount is not a system property",
            ),
            ("line =", "expected a property or a constant"),
            ("line", "expected a comparison"),
            ("'abc", "not closed"),
            ("line = 'a' line", "unexpected line"),
            ("", "empty"),
            ("a # b", "unexpected character '#'"),
        ] {
            let e = parse_sql(text).unwrap_err().to_string();
            assert!(e.contains(part), "{text}: {e}");
        }
    }

    #[test]
    fn correlation_filter_needs_every_set_field() {
        let m = msg("temp", &[("line", SimpleValue::String("line1".into()))]);
        let f = |c: CorrelationFilter| Filter::Correlation(c).matches(&m);
        assert!(f(CorrelationFilter {
            subject: Some("temp".into()),
            ..Default::default()
        }));
        assert!(f(CorrelationFilter {
            subject: Some("temp".into()),
            content_type: Some("application/json".into()),
            correlation_id: Some("42".into()),
            message_id: Some("m-1".into()),
            properties: vec![("line".into(), Lit::Str("line1".into()))],
            ..Default::default()
        }));
        assert!(!f(CorrelationFilter {
            subject: Some("Temp".into()),
            ..Default::default()
        }));
        assert!(!f(CorrelationFilter {
            subject: Some("temp".into()),
            to: Some("x".into()),
            ..Default::default()
        }));
        assert!(!f(CorrelationFilter {
            properties: vec![("line".into(), Lit::Str("line2".into()))],
            ..Default::default()
        }));
        assert!(!f(CorrelationFilter {
            properties: vec![("other".into(), Lit::Str("line1".into()))],
            ..Default::default()
        }));
    }
}
