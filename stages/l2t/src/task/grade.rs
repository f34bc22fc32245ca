//! The outcome grader (l2t-spec section 3): tri-state, and an unparsable gold answer never counts
//! as correct.
//!
//! Answers are the contents of a `\boxed{}` or `\fbox{}`, or a stated answer (see
//! `task::answer::extract_answer_with`). They are normalized in the Hendrycks MATH / PRM800K
//! style (`\left`/`\right`, `\!`, `\dfrac`, `\text{}` and units, degrees, percent, `$`, thousands
//! separators with `{,}`, `x = ` prefixes, base subscripts, brace-less `\sqrt3`, matrix
//! environments), then compared: numbers exactly as rationals (integers, decimals at 6 places,
//! fractions, mixed numbers, ratios); tuples, intervals, sets and bare lists elementwise (a bare
//! list or set in any order); matrices entry by entry; words without case; equations by the
//! difference of their sides; anything else symbolically, by evaluating both expressions (with
//! `exmex`) at seeded random points. The fixtures in tests/fixtures/grader hold the verdicts of the
//! Python oracle `math-verify` 0.9.0 on MATH-500 answers and perturbations of them, and on whole
//! responses to `math_train` problems.

use num_rational::Ratio;
use std::time::{Duration, Instant};

/// A prediction's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grade {
    Correct,
    Wrong,
    /// No answer could be read from the prediction.
    Unparsable,
    /// The gold answer itself could not be read: the prompt is excluded from training.
    GoldUnparsable,
}

impl Grade {
    pub fn as_str(self) -> &'static str {
        match self {
            Grade::Correct => "correct",
            Grade::Wrong => "wrong",
            Grade::Unparsable | Grade::GoldUnparsable => "unparsable",
        }
    }
}

/// Time one comparison may take before it is given up as wrong.
pub const DEADLINE: Duration = Duration::from_millis(200);

/// Grades a predicted answer against a gold answer.
pub fn grade_answer(prediction: &str, gold: &str) -> Grade {
    grade_with_deadline(prediction, gold, DEADLINE)
}

/// Grades an answer that may be missing (no `\\boxed{}` in the response): a missing answer is
/// unparsable, unless the gold answer itself is, which excludes the prompt.
pub fn grade_optional(prediction: Option<&str>, gold: &str) -> Grade {
    match prediction {
        Some(p) => grade_answer(p, gold),
        None if normalize(gold).is_none() => Grade::GoldUnparsable,
        None => Grade::Unparsable,
    }
}

/// [`grade_answer`] with an explicit time budget: a comparison still undecided when it runs out
/// is wrong.
pub fn grade_with_deadline(prediction: &str, gold: &str, budget: Duration) -> Grade {
    let deadline = Instant::now() + budget;
    let (raw_prediction, raw_gold) = (prediction, gold);
    let Some(gold) = normalize(gold) else { return Grade::GoldUnparsable };
    let Some(prediction) = normalize(prediction) else { return Grade::Unparsable };
    if prediction == gold || equivalent(&prediction, &gold, deadline) {
        return Grade::Correct;
    }
    // An equation answering a value: its right side is the answer (`1+2+3 = 6` for 6, as
    // math-verify reads it), unless that side is written as text (`x = \\text{(E)}`, `x = \\text{9}`
    // stay equations for math-verify too). A gold equation is not read so (math-verify reads it so
    // for `x+y=5` but not for `x-y=5`).
    let text_side = raw_prediction.rsplit_once('=').is_some_and(|(_, r)| first_text_command(r.trim()).is_some_and(|(at, _)| at == 0));
    if let (Some((_, r)), None, false) = (equation(&prediction), equation(&gold), text_side) {
        if r == gold || equivalent(&r, &gold, deadline) {
            return Grade::Correct;
        }
    }
    // `p\%` is also p/100 (math-verify reads it so): `50\%` = `0.5`.
    let hundredths = |raw: &str, normal: &str| {
        if raw.contains('%') {
            normalize(&raw.replace("\\%", "/100").replace('%', "/100"))
        } else {
            Some(normal.to_string())
        }
    };
    if raw_prediction.contains('%') || raw_gold.contains('%') {
        if let (Some(p), Some(g)) = (hundredths(raw_prediction, &prediction), hundredths(raw_gold, &gold)) {
            if p == g || equivalent(&p, &g, deadline) {
                return Grade::Correct;
            }
        }
    }
    Grade::Wrong
}

/// Reads an integer the way people write one: surrounding spaces and `$`, a leading `+`,
/// thousands separators (`1,234`), and a trailing `.0`.
pub fn parse_integer(text: &str) -> Option<i64> {
    let t = text.trim().trim_matches('$').trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    let t = t.strip_suffix(".0").unwrap_or(t);
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let plain = strip_thousands(digits)?;
    if plain.is_empty() || !plain.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = plain.parse().ok()?;
    Some(if negative { -value } else { value })
}

/// `1,234,567` -> `1234567`; a number without commas as is; misplaced commas -> None.
fn strip_thousands(digits: &str) -> Option<String> {
    let (int, frac) = digits.split_once('.').map_or((digits, None), |(i, f)| (i, Some(f)));
    let groups: Vec<&str> = int.split(',').collect();
    let grouped_ok = groups.len() == 1
        || (!groups[0].is_empty()
            && groups[0].len() <= 3
            && groups[1..].iter().all(|g| g.len() == 3 && g.bytes().all(|b| b.is_ascii_digit())));
    grouped_ok.then(|| groups.concat() + &frac.map(|f| format!(".{f}")).unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Normalization

/// Commands whose argument is plain text: a trailing one after an answer is a unit, otherwise
/// its content is the answer.
const TEXT_COMMANDS: &[&str] = &["\\text", "\\textbf", "\\textit", "\\mbox", "\\mathrm", "\\textnormal", "\\mathbf", "\\operatorname"];

/// Stands for `\\\\` while normalizing.
const ROW_BREAK: &str = "\u{1d}";

/// Stands for a comma that separates items while normalizing (kept out of thousands).
const LIST_COMMA: char = '\u{1e}';

/// The canonical form of an answer, or None when nothing can be read (empty, unbalanced braces).
pub fn normalize(answer: &str) -> Option<String> {
    let mut s = answer.trim().to_string();
    if s.matches('{').count() != s.matches('}').count() {
        return None;
    }
    // A row break `\\\\` is kept whole (the `\\ ` rule below would split it).
    s = s.replace("\\\\", ROW_BREAK);
    // `45, 135` is a list, not 45,135: a comma with a space after it (and none before) separates items.
    let chars: Vec<char> = s.chars().collect();
    s = chars
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if c == ',' && i > 0 && !chars[i - 1].is_whitespace() && chars.get(i + 1).is_some_and(|n| n.is_whitespace()) {
                LIST_COMMA
            } else {
                c
            }
        })
        .collect();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\bigl", ""),
        ("\\bigr", ""),
        ("\\Bigl", ""),
        ("\\Bigr", ""),
        ("\\displaystyle", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("{,}", ","),
        ("\\begin{bmatrix}", "\\begin{pmatrix}"),
        ("\\end{bmatrix}", "\\end{pmatrix}"),
        ("\\begin{Bmatrix}", "\\begin{pmatrix}"),
        ("\\end{Bmatrix}", "\\end{pmatrix}"),
        ("\\begin{smallmatrix}", "\\begin{pmatrix}"),
        ("\\end{smallmatrix}", "\\end{pmatrix}"),
        ("\\begin{matrix}", "\\begin{pmatrix}"),
        ("\\end{matrix}", "\\end{pmatrix}"),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", " "),
        ("\\text {", "\\text{"),
        ("\\$", ""),
        ("$", ""),
        ("\\%", ""),
        ("%", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("\\degree", ""),
        ("°", ""),
        ("\\le ", "\\le"),
        ("\\neq", "\\ne"),
        ("\\leq", "\\le"),
        ("\\geq", "\\ge"),
        ("~", " "),
        ("\n", " "),
    ] {
        s = s.replace(from, to);
    }
    s = strip_variable_prefix(&s);
    s = strip_text_commands(&s);
    let mut s: String = s.chars().filter(|c| !c.is_whitespace()).collect::<String>().replace(ROW_BREAK, "\\\\");
    s = fix_short_args(&s);
    s = unbrace_subscripts(&s);
    // An interval never includes an infinite end: `[-\infty, 0]` is `(-\infty, 0]` (math-verify reads it so).
    s = s.replace("[-\\infty", "(-\\infty").replace("\\infty]", "\\infty)");
    s = s.replace("\\\\\\end{pmatrix}", "\\end{pmatrix}");
    if let Some(rest) = s.strip_prefix('.') {
        s = format!("0.{rest}");
    }
    s = s.replace("-.", "-0.").replace("{.", "{0.").replace("(.", "(0.").replace(",.", ",0.");
    while s.ends_with('.') && !s.ends_with("..") {
        s.pop();
    }
    if let Some(plain) = s.strip_prefix('-').map_or_else(|| strip_thousands(&s), |rest| strip_thousands(rest).map(|p| format!("-{p}"))) {
        if plain.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-') {
            s = plain;
        }
    }
    s = s.replace(LIST_COMMA, ",");
    s = strip_listed_names(&s);
    if let Some(interval) = inequality_interval(&s) {
        s = interval;
    }
    (!s.is_empty()).then_some(s)
}

/// `\text{..}` and its kin: a trailing one after an answer that is not itself text is a unit and
/// goes (with an exponent on it, `\text{cm}^2`); every other keeps its content.
fn strip_text_commands(s: &str) -> String {
    let mut out = drop_trailing_unit(s);
    while let Some((at, cmd)) = first_text_command(&out) {
        let open = at + cmd.len();
        let Some(close) = matching_brace(&out, open) else { return out };
        // A choice letter in text has no case (`\\text{e}` = `\\text{(E)}`, as math-verify reads it).
        let inner = &out[open + 1..close];
        let letter = inner.trim().trim_start_matches('(').trim_end_matches(')');
        let inner = if letter.chars().count() == 1 && letter.chars().all(|c| c.is_ascii_alphabetic()) {
            inner.to_ascii_uppercase()
        } else {
            inner.to_string()
        };
        out = format!("{}{}{}", &out[..at], inner, &out[close + 1..]);
    }
    out
}

fn first_text_command(s: &str) -> Option<(usize, &'static str)> {
    TEXT_COMMANDS.iter().filter_map(|c| find_command(s, c).map(|i| (i, *c))).min_by_key(|(i, _)| *i)
}

/// `12\text{ cm}^2` -> `12`; `\text{(B)}\text{ units}` stays (a text answer has no unit).
fn drop_trailing_unit(s: &str) -> String {
    let t = s.trim_end();
    let body = match t.rfind('^') {
        Some(i) if t[i + 1..].trim_matches(|c| c == '{' || c == '}').chars().all(|c| c.is_ascii_digit()) && !t[i + 1..].is_empty() => {
            &t[..i]
        }
        _ => t,
    };
    let Some(close) = body.strip_suffix('}').map(|b| b.len()) else { return s.to_string() };
    let Some((at, cmd)) = TEXT_COMMANDS.iter().filter_map(|c| body.rfind(&format!("{c}{{")).map(|i| (i, *c))).max_by_key(|(i, _)| *i)
    else {
        return s.to_string();
    };
    let open = at + cmd.len();
    let unit = &body[open + 1..close];
    let mut before = body[..at].trim().to_string();
    // Units after units (`18\\text{ integers}\\text{ units}`) go too, down to a non-text answer.
    if first_text_command(&before).is_some() && before.len() < s.len() {
        before = drop_trailing_unit(&before);
    }
    if matching_brace(body, open) != Some(close)
        || before.is_empty()
        || first_text_command(&before).is_some()
        || !unit.chars().all(|c| c.is_alphabetic() || c == ' ' || c == '.')
    {
        return s.to_string();
    }
    before
}

/// Position of `cmd` directly followed by `{` (so `\\text` does not match `\\textbf{`).
fn find_command(s: &str, cmd: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(cmd) {
        let at = from + i;
        if s[at + cmd.len()..].starts_with('{') {
            return Some(at);
        }
        from = at + cmd.len();
    }
    None
}

/// Index of the `}` matching the `{` at `open`.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    if s.as_bytes().get(open) != Some(&b'{') {
        return None;
    }
    let mut depth = 0;
    for (i, b) in s.bytes().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `x = 3` -> `3`, `k=2` -> `2`, `x \in [1, 2]` -> `[1, 2]`: a short variable name on the left of
/// the only `=`.
fn strip_variable_prefix(s: &str) -> String {
    let t = s.trim();
    if let Some(rest) = t.strip_prefix("x\\in").or_else(|| t.strip_prefix("x \\in")) {
        return rest.trim().to_string();
    }
    if t.matches('=').count() == 1 {
        let (lhs, rhs) = t.split_once('=').expect("one '='");
        let lhs = lhs.trim();
        // `x = \text{(E)}` stays whole (math-verify reads it as text); `x = 15\text{ cm}^2` does not.
        let rhs = rhs.trim();
        let rhs_is_text = first_text_command(rhs).is_some_and(|(at, cmd)| at == 0 && matching_brace(rhs, cmd.len()) == Some(rhs.len() - 1));
        // A function name with its variable counts as a name: `f(x) = x^2`.
        let function = lhs.len() == 4
            && lhs.as_bytes()[0].is_ascii_alphabetic()
            && lhs.as_bytes()[1] == b'('
            && lhs.as_bytes()[2].is_ascii_alphabetic()
            && lhs.as_bytes()[3] == b')';
        if !lhs.is_empty()
            && (lhs.len() <= 2 && lhs.chars().all(|c| c.is_ascii_alphabetic()) || function)
            && !rhs.trim().is_empty()
            && !rhs_is_text
        {
            return rhs.trim().to_string();
        }
        // `15 = k`, `x + 3 = y`: the variable on the right.
        if !rhs.is_empty()
            && rhs.len() <= 2
            && rhs.chars().all(|c| c.is_ascii_alphabetic())
            && !lhs.is_empty()
            && first_text_command(lhs).is_none()
        {
            return lhs.to_string();
        }
    }
    t.to_string()
}

/// `a=1,b=2` -> `1,2`, `x=-2,x=1` -> `-2,1`: a list whose every item names its value.
fn strip_listed_names(s: &str) -> String {
    let items = split_top_level(s, ",");
    if items.len() < 2 {
        return s.to_string();
    }
    let values: Option<Vec<&str>> = items
        .iter()
        .map(|item| {
            let (name, value) = item.split_once('=')?;
            (!name.is_empty()
                && name.len() <= 2
                && name.chars().all(|c| c.is_ascii_alphabetic())
                && !value.is_empty()
                && !value.contains('='))
            .then_some(value)
        })
        .collect();
    values.map_or_else(|| s.to_string(), |v| v.join(","))
}

/// An inequality in one letter as the interval it describes: `x\le2` -> `(-\infty,2]`,
/// `-1<x\le3` -> `(-1,3]`, `x>0` -> `(0,\infty)` (normalized text, no spaces).
fn inequality_interval(s: &str) -> Option<String> {
    // Split into operands and relations.
    let mut parts: Vec<&str> = Vec::new();
    let mut relations: Vec<&str> = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < s.len() {
        let rest = &s[i..];
        let op = ["\\le", "\\ge", "<=", ">=", "<", ">"].into_iter().find(|op| rest.starts_with(op));
        match op {
            Some(op) => {
                parts.push(&s[start..i]);
                relations.push(op);
                i += op.len();
                start = i;
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    parts.push(&s[start..]);
    let var = |p: &str| p.len() == 1 && p.chars().all(|c| c.is_ascii_alphabetic());
    let less = |op: &str| op.starts_with('<') || op == "\\le";
    let closed = |op: &str| op == "\\le" || op == "\\ge" || op.ends_with('=');
    let valid = |p: &str| !p.is_empty() && !var(p);
    match (parts.as_slice(), relations.as_slice()) {
        ([x, a], [op]) if var(x) && valid(a) => Some(if less(op) {
            format!("(-\\infty,{a}{}", if closed(op) { "]" } else { ")" })
        } else {
            format!("{}{a},\\infty)", if closed(op) { "[" } else { "(" })
        }),
        ([a, x], [op]) if var(x) && valid(a) => inequality_interval(&format!(
            "{x}{}{a}",
            match *op {
                "<" => ">",
                ">" => "<",
                "<=" | "\\le" => "\\ge",
                _ => "\\le",
            }
        )),
        ([a, x, b], [o1, o2]) if var(x) && valid(a) && valid(b) && less(o1) == less(o2) => {
            let (lo, hi, lo_closed, hi_closed) = if less(o1) { (a, b, closed(o1), closed(o2)) } else { (b, a, closed(o2), closed(o1)) };
            Some(format!("{}{lo},{hi}{}", if lo_closed { "[" } else { "(" }, if hi_closed { "]" } else { ")" }))
        }
        _ => None,
    }
}

/// `\frac12` -> `\frac{1}{2}`, `\frac1{2}` -> `\frac{1}{2}`, `\sqrt2` -> `\sqrt{2}`.
fn fix_short_args(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut rest = s;
    while !rest.is_empty() {
        let (cmd, args) = if rest.starts_with("\\frac") && !rest[5..].starts_with(|c: char| c.is_ascii_alphabetic()) {
            ("\\frac", 2)
        } else if rest.starts_with("\\sqrt") && !rest[5..].starts_with('[') {
            ("\\sqrt", 1)
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        };
        out.push_str(cmd);
        rest = &rest[cmd.len()..];
        for _ in 0..args {
            match rest.chars().next() {
                Some('{') => {
                    let Some(close) = matching_brace(rest, 0) else {
                        // An argument that never closes: the rest as it is.
                        out.push_str(rest);
                        return out;
                    };
                    out.push('{');
                    out.push_str(&fix_short_args(&rest[1..close]));
                    out.push('}');
                    rest = &rest[close + 1..];
                }
                Some(c) if c != '\\' => {
                    out.push('{');
                    out.push(c);
                    out.push('}');
                    rest = &rest[c.len_utf8()..];
                }
                _ => break,
            }
        }
    }
    out
}

/// `443_{5}` -> `443_5`: a braced subscript of letters and digits loses its braces.
fn unbrace_subscripts(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("_{") {
        out.push_str(&rest[..at + 1]);
        let after = &rest[at + 1..];
        match matching_brace(after, 0) {
            Some(close) if close > 1 && after[1..close].bytes().all(|b| b.is_ascii_alphanumeric()) => {
                out.push_str(&after[1..close]);
                rest = &after[close + 1..];
            }
            _ => rest = after,
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Comparison

/// Two normalized answers: same structure and equivalent parts.
fn equivalent(a: &str, b: &str, deadline: Instant) -> bool {
    // `a \pm b` is the pair `a + b, a - b`.
    let plus_minus = |s: &str| {
        (s.matches("\\pm").count() == 1 && split_top_level(s, ",").len() == 1)
            .then(|| format!("{},{}", s.replacen("\\pm", "+", 1), s.replacen("\\pm", "-", 1)))
    };
    if let Some(a) = plus_minus(a) {
        return equivalent(&a, b, deadline);
    }
    if let Some(b) = plus_minus(b) {
        return equivalent(a, &b, deadline);
    }
    if let (Some(x), Some(y)) = (matrix_entries(a), matrix_entries(b)) {
        return x.len() == y.len()
            && x.iter()
                .zip(&y)
                .all(|(p, q)| p.len() == q.len() && p.iter().zip(q).all(|(u, v)| u == v || scalar_equivalent(u, v, deadline)));
    }
    if let (Some((l1, r1)), Some((l2, r2))) = (equation(a), equation(b)) {
        // Sides swapped or terms moved: the differences agree, up to sign.
        if (l1 == l2 && r1 == r2) || (l1 == r2 && r1 == l2) {
            return true;
        }
        let (d1, d2) = (format!("({l1})-({r1})"), format!("({l2})-({r2})"));
        return symbolic_equivalent(&d1, &d2, deadline) || symbolic_equivalent(&d1, &format!("({r2})-({l2})"), deadline);
    }
    match (Structure::of(a), Structure::of(b)) {
        (Structure::Union(x), Structure::Union(y)) => x.len() == y.len() && unordered_match(&x, &y, deadline),
        (Structure::Seq { open: o1, close: c1, items: x }, Structure::Seq { open: o2, close: c2, items: y }) => {
            let unordered = |o: &str| o == "\\{" || o.is_empty();
            if x.len() != y.len() || !(unordered(&o1) && unordered(&o2)) && (o1 != o2 || c1 != c2) {
                return false;
            }
            if unordered(&o1) && unordered(&o2) {
                unordered_match(&x, &y, deadline)
            } else {
                x.iter().zip(&y).all(|(p, q)| p == q || scalar_equivalent(p, q, deadline))
            }
        }
        (Structure::Scalar(x), Structure::Scalar(y)) => scalar_equivalent(&x, &y, deadline),
        _ => false,
    }
}

/// The rows of entries of a `\\begin{pmatrix}..\\end{pmatrix}` (other environments are made
/// `pmatrix` by [`normalize`]).
fn matrix_entries(s: &str) -> Option<Vec<Vec<String>>> {
    let body = s.strip_prefix("\\begin{pmatrix}")?.strip_suffix("\\end{pmatrix}")?;
    Some(split_top_level(body, "\\\\").iter().map(|row| split_top_level(row, "&")).collect())
}

/// The two sides of an equation with one `=` (none of `<`, `>`, `\\le`, `\\ge`).
fn equation(s: &str) -> Option<(String, String)> {
    let parts = split_top_level(s, "=");
    (parts.len() == 2
        && parts.iter().all(|p| !p.is_empty())
        && !s.contains(['<', '>'])
        && !s.contains("\\le")
        && !s.contains("\\ge")
        && !s.contains("\\ne"))
    .then(|| (parts[0].clone(), parts[1].clone()))
}

/// Every item of `x` pairs with a distinct equivalent item of `y`.
fn unordered_match(x: &[String], y: &[String], deadline: Instant) -> bool {
    let mut used = vec![false; y.len()];
    x.iter().all(|p| {
        let hit = (0..y.len()).find(|&j| !used[j] && (p == &y[j] || equivalent(p, &y[j], deadline)));
        hit.map(|j| used[j] = true).is_some()
    })
}

/// The shape of an answer.
#[derive(Debug, PartialEq)]
enum Structure {
    /// `A \cup B \cup ..`
    Union(Vec<String>),
    /// `(a, b)`, `[a, b)`, `\{a, b\}`, or a bare `a, b` (open and close empty).
    Seq {
        open: String,
        close: String,
        items: Vec<String>,
    },
    Scalar(String),
}

impl Structure {
    fn of(s: &str) -> Self {
        let parts = split_top_level(s, "\\cup");
        if parts.len() > 1 {
            return Structure::Union(parts);
        }
        for (open, closes) in [("\\{", &["\\}"][..]), ("(", &[")", "]"][..]), ("[", &["]", ")"][..])] {
            if let Some(inner) = s.strip_prefix(open) {
                for close in closes {
                    if let Some(inner) = inner.strip_suffix(close) {
                        if enclosing(s, open.len(), s.len() - close.len()) {
                            let items = split_top_level(inner, ",");
                            if items.len() > 1 || open == "\\{" {
                                return Structure::Seq { open: open.into(), close: (*close).into(), items };
                            }
                        }
                    }
                }
            }
        }
        let items = split_top_level(s, ",");
        if items.len() > 1 {
            return Structure::Seq { open: String::new(), close: String::new(), items };
        }
        Structure::Scalar(s.to_string())
    }
}

/// Whether the bracket opened before `from` closes at `to` (the whole of `s` is one group).
fn enclosing(s: &str, from: usize, to: usize) -> bool {
    let mut depth = 0i32;
    for c in s[from..to].chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Splits on `sep` outside any brackets.
fn split_top_level(s: &str, sep: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut start, mut i) = (0i32, 0usize, 0usize);
    let bytes = s.as_bytes();
    while i < s.len() {
        // Separators and brackets are ASCII, so only byte positions that start a character matter.
        if !s.is_char_boundary(i) {
            i += 1;
            continue;
        }
        if depth == 0 && s[i..].starts_with(sep) {
            parts.push(s[start..i].to_string());
            i += sep.len();
            start = i;
            continue;
        }
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    parts.push(s[start..].to_string());
    parts
}

fn scalar_equivalent(a: &str, b: &str, deadline: Instant) -> bool {
    if a == b {
        return true;
    }
    // Words compare without case: `Sunday` = `SUNDAY` (text contents are lowercased already).
    // Words compare without case, as math-verify compares them: `Sunday` = `SUNDAY`. A single
    // letter keeps its case (math-verify drops it: `x` = `X`), so that the decompose testbed's 52
    // letter nodes stay distinct answers; `(B)` = `B`.
    let bare = |s: &str| s.trim_start_matches('(').trim_end_matches(')').to_string();
    let (wa, wb) = (bare(a), bare(b));
    let word = |s: &str| s.chars().count() >= 2 && s.chars().all(char::is_alphabetic);
    if word(&wa) && word(&wb) {
        return wa.to_lowercase() == wb.to_lowercase();
    }
    if wa.chars().count() == 1 && wa.chars().all(char::is_alphabetic) && (wa != a || wb != b) {
        return wa == wb;
    }
    // A ratio of numbers is their quotient: `1:2` = `\\frac{1}{2}`.
    let ratio =
        |s: &str| s.split_once(':').and_then(|(p, q)| Some(parse_rational(p)? / parse_rational(q).filter(|q| *q != Q::from_integer(0))?));
    if a.contains(':') || b.contains(':') {
        return match (ratio(a).or_else(|| parse_rational(a)), ratio(b).or_else(|| parse_rational(b))) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
    }
    if let (Some(x), Some(y)) = (parse_rational(a), parse_rational(b)) {
        // A decimal is compared at 6 places (math-verify's convention): 0.722222 is 13/18, and
        // 0.26087 is 6/23 (6/23 rounds to 0.260870).
        if decimal_places(a).max(decimal_places(b)) > 0 {
            return round_places(x) == round_places(y);
        }
        return x == y;
    }
    symbolic_equivalent(a, b, deadline)
}

type Q = Ratio<i128>;

/// Decimal places at which a written decimal is read as rounded.
const ROUNDED_PLACES: usize = 6;

fn decimal_places(s: &str) -> usize {
    s.split_once('.').map_or(0, |(_, f)| f.len())
}

/// `x` rounded half away from zero to [`ROUNDED_PLACES`] decimals, as an integer count of units.
fn round_places(x: Q) -> Option<i128> {
    let scaled = Q::new(x.numer().checked_mul(10i128.pow(ROUNDED_PLACES as u32))?, *x.denom());
    Some(scaled.round().to_integer())
}

/// An exact number: integer, decimal, `a/b`, `\frac{a}{b}`, mixed `n\frac{a}{b}`, with a sign.
fn parse_rational(s: &str) -> Option<Q> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let value = if let Some(rest) = body.strip_prefix("\\frac{") {
        let close = matching_brace(body, 5)?;
        let num = decimal(&rest[..close - 6])?;
        let den_part = &body[close + 1..];
        let den = decimal(den_part.strip_prefix('{')?.strip_suffix('}')?)?;
        (den != Q::from_integer(0)).then(|| num / den)?
    } else if let Some(at) = body.find("\\frac{") {
        // A mixed number: whole part, then a proper fraction.
        let whole = decimal(&body[..at])?;
        if !whole.is_integer() {
            return None;
        }
        let frac = parse_rational(&body[at..])?;
        let numer = whole.numer().checked_mul(*frac.denom())?.checked_add(*frac.numer())?;
        Q::new(numer, *frac.denom())
    } else if let Some((num, den)) = body.split_once('/') {
        let den = decimal(den)?;
        (den != Q::from_integer(0)).then(|| decimal(num).map(|n| n / den))??
    } else {
        decimal(body)?
    };
    Some(if negative { -value } else { value })
}

/// An integer or a finite decimal, of at most 18 digits so that products of two fit in i128.
fn decimal(s: &str) -> Option<Q> {
    let (int, frac) = s.split_once('.').map_or((s, ""), |(i, f)| (i, f));
    let int = int.trim_start_matches('0');
    if int.is_empty() && frac.is_empty() && !s.starts_with('0')
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || int.len() + frac.len() > 18
    {
        return None;
    }
    let digits: i128 = format!("0{int}{frac}").parse().ok()?;
    let scale = 10i128.checked_pow(frac.len() as u32)?;
    Some(Q::new(digits, scale))
}

/// Points each variable takes; both expressions must agree at every point where both are
/// defined, and be defined at enough of them.
const POINTS: usize = 6;

fn symbolic_equivalent(a: &str, b: &str, deadline: Instant) -> bool {
    let (Some(x), Some(y)) = (to_expression(a), to_expression(b)) else { return false };
    if Instant::now() > deadline {
        return false;
    }
    let (Ok(fx), Ok(fy)) = (exmex::parse::<f64>(&x), exmex::parse::<f64>(&y)) else { return false };
    use exmex::Express;
    let mut names: Vec<String> = fx.var_names().iter().chain(fy.var_names()).cloned().collect();
    names.sort();
    names.dedup();
    let mut agreeing = 0;
    for point in 0..POINTS {
        if Instant::now() > deadline {
            return false;
        }
        // Seeded, irregular values in [0.6, 2.4) so square roots and logs stay real.
        let value_of = |name: &str| -> f64 {
            let h = crate::config::seed_of(&format!("{name}/{point}"));
            0.6 + 1.8 * (h >> 11) as f64 / (1u64 << 53) as f64
        };
        let eval = |f: &exmex::FlatEx<f64>| -> f64 {
            let args: Vec<f64> = f.var_names().iter().map(|n| value_of(n)).collect();
            f.eval(&args).unwrap_or(f64::NAN)
        };
        let (u, v) = (eval(&fx), eval(&fy));
        if !u.is_finite() && !v.is_finite() {
            continue;
        }
        if !u.is_finite() || !v.is_finite() || (u - v).abs() > 1e-8 * u.abs().max(v.abs()).max(1.0) {
            return false;
        }
        agreeing += 1;
    }
    agreeing >= POINTS / 2
}

/// Functions written as LaTeX commands, and their exmex names.
const FUNCTIONS: &[(&str, &str)] = &[
    ("\\sin", "sin"),
    ("\\cos", "cos"),
    ("\\tan", "tan"),
    ("\\arcsin", "asin"),
    ("\\arccos", "acos"),
    ("\\arctan", "atan"),
    ("\\ln", "ln"),
    ("\\log", "ln"),
    ("\\exp", "exp"),
];

const GREEK: &[&str] = &["alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "phi", "omega", "sigma", "tau", "rho"];

/// A normalized LaTeX answer as an exmex expression: `\frac`, `\sqrt` (and `\sqrt[n]`), powers,
/// `\pi`, `\cdot`/`\times`, functions, single-letter variables and implicit products. None for
/// what is not an expression (relations, `\pm`, `\infty`, text).
fn to_expression(s: &str) -> Option<String> {
    let mut tokens = Vec::new();
    tokenize(s, &mut tokens)?;
    if tokens.is_empty() {
        return None;
    }
    // Implicit products: a value followed by the start of another value.
    let mut out = String::new();
    let mut prev: Option<&Tok> = None;
    for t in &tokens {
        if prev.is_some_and(|p| p.ends_value()) && t.starts_value() {
            out.push('*');
        }
        out.push_str(&t.text());
        prev = Some(t);
    }
    Some(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Var(String),
    Const(&'static str),
    Func(&'static str),
    Op(char),
    Open,
    Close,
}

impl Tok {
    fn ends_value(&self) -> bool {
        matches!(self, Tok::Num(_) | Tok::Var(_) | Tok::Const(_) | Tok::Close)
    }

    fn starts_value(&self) -> bool {
        matches!(self, Tok::Num(_) | Tok::Var(_) | Tok::Const(_) | Tok::Func(_) | Tok::Open)
    }

    fn text(&self) -> String {
        match self {
            Tok::Num(n) => n.clone(),
            Tok::Var(v) => format!("v_{v}"),
            Tok::Const(c) => (*c).to_string(),
            Tok::Func(f) => (*f).to_string(),
            Tok::Op(c) => c.to_string(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
        }
    }
}

/// Appends the tokens of `s`; None on anything that is not part of an expression.
fn tokenize(s: &str, out: &mut Vec<Tok>) -> Option<()> {
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() || c == '.' {
            let n = rest.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(rest.len());
            out.push(Tok::Num(rest[..n].to_string()));
            rest = &rest[n..];
        } else if c.is_ascii_alphabetic() {
            out.push(Tok::Var(c.to_string()));
            rest = &rest[1..];
        } else if let Some(r) = rest.strip_prefix("\\frac") {
            let (num, r) = braced(r)?;
            let (den, r) = braced(r)?;
            out.push(Tok::Open);
            group(num, out)?;
            out.push(Tok::Op('/'));
            group(den, out)?;
            out.push(Tok::Close);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("\\sqrt") {
            let (index, r) = match r.strip_prefix('[') {
                Some(r) => {
                    let close = r.find(']')?;
                    (Some(&r[..close]), &r[close + 1..])
                }
                None => (None, r),
            };
            let (arg, r) = braced(r)?;
            out.push(Tok::Open);
            group(arg, out)?;
            out.push(Tok::Op('^'));
            out.push(Tok::Open);
            out.push(Tok::Num("1".into()));
            out.push(Tok::Op('/'));
            match index {
                Some(n) => group(n, out)?,
                None => out.push(Tok::Num("2".into())),
            }
            out.push(Tok::Close);
            out.push(Tok::Close);
            rest = r;
        } else if let Some((cmd, name)) =
            FUNCTIONS.iter().find(|(cmd, _)| rest.starts_with(cmd) && !rest[cmd.len()..].starts_with(|ch: char| ch.is_ascii_alphabetic()))
        {
            out.push(Tok::Func(name));
            rest = &rest[cmd.len()..];
            // An argument without parentheses: the next atom.
            if !rest.starts_with('(') && !rest.starts_with('{') && !rest.starts_with('^') {
                let n = match rest.find(|ch: char| !ch.is_ascii_alphanumeric()).unwrap_or(rest.len()) {
                    0 => rest.chars().next().map_or(0, char::len_utf8),
                    n => n,
                };
                out.push(Tok::Open);
                tokenize(&rest[..n], out)?;
                out.push(Tok::Close);
                rest = &rest[n..];
            }
        } else if let Some(r) = rest.strip_prefix("\\pi") {
            out.push(Tok::Const("PI"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("\\cdot").or_else(|| rest.strip_prefix("\\times")).or_else(|| rest.strip_prefix('*')) {
            out.push(Tok::Op('*'));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("\\div") {
            out.push(Tok::Op('/'));
            rest = r;
        } else if let Some(g) = GREEK.iter().find(|g| rest.strip_prefix('\\').is_some_and(|r| r.starts_with(**g))) {
            out.push(Tok::Var((*g).to_string()));
            rest = &rest[1 + g.len()..];
        } else if "+-/^".contains(c) {
            out.push(Tok::Op(c));
            rest = &rest[1..];
        } else if c == '(' || c == '[' {
            out.push(Tok::Open);
            rest = &rest[1..];
        } else if c == ')' || c == ']' {
            out.push(Tok::Close);
            rest = &rest[1..];
        } else if c == '{' {
            let (inner, r) = braced(rest)?;
            group(inner, out)?;
            rest = r;
        } else {
            return None;
        }
    }
    Some(())
}

/// `inner` as one parenthesized group.
fn group(inner: &str, out: &mut Vec<Tok>) -> Option<()> {
    out.push(Tok::Open);
    tokenize(inner, out)?;
    out.push(Tok::Close);
    Some(())
}

/// The contents of the `{..}` that `s` starts with, and what follows it.
fn braced(s: &str) -> Option<(&str, &str)> {
    let close = matching_brace(s, 0)?;
    Some((&s[1..close], &s[close + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_common_spellings() {
        for (text, want) in
            [("42", Some(42)), (" -7 ", Some(-7)), ("+3", Some(3)), ("1,234", Some(1234)), ("$5", Some(5)), ("12.0", Some(12))]
        {
            assert_eq!(parse_integer(text), want, "{text:?}");
        }
        for text in ["", "abc", "1,23", "4.5", "--1", "12a", ",123"] {
            assert_eq!(parse_integer(text), None, "{text:?}");
        }
    }

    #[test]
    fn tri_state_and_unparsable_gold() {
        assert_eq!(grade_answer("187", "187"), Grade::Correct);
        assert_eq!(grade_answer("186", "187"), Grade::Wrong);
        assert_eq!(grade_answer("", "187"), Grade::Unparsable);
        // An unparsable gold answer never makes a prediction correct, even an identical one.
        assert_eq!(grade_answer("", ""), Grade::GoldUnparsable);
        assert_eq!(grade_answer("\\frac{1}{", "\\frac{1}{"), Grade::GoldUnparsable);
    }

    #[test]
    fn numbers_compare_exactly_as_rationals() {
        for (a, b) in [
            ("\\frac{1}{2}", "0.5"),
            ("\\dfrac{3}{4}", "3/4"),
            ("\\frac{6}{8}", "\\tfrac34"),
            ("2\\frac{1}{3}", "\\frac{7}{3}"),
            ("1,000,000", "1000000"),
            ("50\\%", "50"),
            ("-\\frac{1}{2}", "-.5"),
            ("10.", "10"),
            ("\\$5.00", "5"),
        ] {
            assert_eq!(grade_answer(a, b), Grade::Correct, "{a} vs {b}");
        }
        // Six or more decimal places are read as rounded: 1/3 is 0.333333 but not 0.33333.
        assert_eq!(grade_answer("\\frac{1}{3}", "0.333333"), Grade::Correct);
        for (a, b) in [("\\frac{1}{3}", "0.33333"), ("\\frac{2}{3}", "\\frac{3}{2}"), ("-1", "1"), ("0.1", "0.100001")] {
            assert_eq!(grade_answer(a, b), Grade::Wrong, "{a} vs {b}");
        }
    }

    #[test]
    fn notation_units_and_prefixes_are_normalized() {
        for (a, b) in [
            ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
            ("90^\\circ", "90"),
            ("12\\text{ cm}^2", "12"),
            ("\\text{(B)}", "(B)"),
            ("x = 5", "5"),
            ("10,\\!080", "10080"),
            ("\\text{Evelyn}", "Evelyn"),
        ] {
            assert_eq!(grade_answer(a, b), Grade::Correct, "{a} vs {b}");
        }
        // A word answer with a unit after it stays a different text.
        assert_eq!(grade_answer("\\text{even}\\text{ units}", "\\text{even}"), Grade::Wrong);
    }

    #[test]
    fn tuples_intervals_and_sets_elementwise() {
        assert_eq!(grade_answer("(1, \\frac{1}{2})", "(1,0.5)"), Grade::Correct);
        assert_eq!(grade_answer("(2, 1)", "(1,2)"), Grade::Wrong, "tuples are ordered");
        assert_eq!(grade_answer("[1, 2)", "[1,2]"), Grade::Wrong, "interval ends matter");
        assert_eq!(grade_answer("\\{3, 1\\}", "\\{1,3\\}"), Grade::Correct, "sets are not");
        assert_eq!(grade_answer("-2, 1", "1,-2"), Grade::Correct, "bare lists are sets");
        assert_eq!(grade_answer("(3,4) \\cup (-\\infty, 0]", "(-\\infty,0]\\cup(3,4)"), Grade::Correct);
        assert_eq!(grade_answer("(1,2)", "1"), Grade::Wrong);
    }

    #[test]
    fn expressions_by_evaluation() {
        for (a, b) in [
            ("2\\sqrt{3}", "\\sqrt{12}"),
            ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt3"),
            ("x^2+2x+1", "(x+1)^2"),
            ("2x + 3", "3+2x"),
            ("\\frac{\\pi}{4}", "0.25\\pi"),
            ("\\sqrt[3]{8}", "2"),
            ("a\\cdot b", "ba"),
        ] {
            assert_eq!(grade_answer(a, b), Grade::Correct, "{a} vs {b}");
        }
        for (a, b) in [("x^2+2x", "(x+1)^2"), ("\\sqrt{3}", "3"), ("\\pi", "3.14"), ("x", "y")] {
            assert_eq!(grade_answer(a, b), Grade::Wrong, "{a} vs {b}");
        }
    }

    #[test]
    fn odd_input_gets_a_verdict_not_a_panic() {
        let odd = [
            "\\sin é",
            "é",
            "\\frac",
            "\\sqrt[",
            "{{}}",
            "^",
            "\\text{",
            "}{",
            "1/0",
            "\\frac{1}{0}",
            "((((",
            "]",
            "\\sqrt[3",
            "0.0000000000000000000001",
            "99999999999999999999999",
            "x^^2",
            "\\frac{a}",
            "\\left(",
            "$",
            "\\%",
            "12 \\text {cm}",
            "}\\frac{é",
            "}\\sqrt{é",
            "_{é}",
            "\\text{é}\\text{é}",
            "1:0",
            "a:b:c",
            "=",
            "==",
            "x=",
            "=x",
        ];
        for a in odd {
            for b in odd {
                let _ = grade_answer(a, b);
            }
        }
        assert_eq!(grade_answer("12 \\text {cm}", "12"), Grade::Correct);
        assert_eq!(grade_answer("1/0", "2/0"), Grade::Wrong);
    }

    /// The failure classes of issue 13 and their neighbours, one case or more each.
    #[test]
    fn issue_13_classes() {
        let same = [
            // Sets in braces, reordered, against a bare list or a set.
            ("-4, 4", "\\{4, -4\\}"),
            ("0,1", "\\{1, 0\\}"),
            ("\\{1,2,3\\}", "3, 1, 2"),
            // Base subscripts.
            ("443_5", "443_{5}"),
            ("1011_{2}", "1011_2"),
            // Matrices: environment and spacing.
            ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
            ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\\\\\end{pmatrix}"),
            ("\\begin{pmatrix} \\frac{1}{2} & 0 \\end{pmatrix}", "\\begin{matrix} 0.5 & 0 \\end{matrix}"),
            // Brace-less roots, also inside another command's argument.
            ("\\frac{\\sqrt3}{9}", "\\frac{\\sqrt{3}}{9}"),
            ("-\\frac{16\\sqrt3}{9}", "-\\frac{16 \\sqrt{3}}{9}"),
            // Thousands with {,}.
            ("5{,}040", "5040"),
            ("2{,}039{,}191", "2,039,191"),
            // Case inside \text{}.
            ("\\text{Odd}", "\\text{odd}"),
            ("\\text{Saturday}", "\\text{saturday}"),
            ("\\text{SUNDAY}", "Sunday"),
            ("\\text{(E)}", "\\text{e}"),
            ("\\text{(B)}", "B"),
            // Equations with sides swapped or terms moved.
            ("0 = x - 3z", "x - 3z = 0"),
            ("-3z + x = 0", "x - 3z = 0"),
            ("y = x + 3", "x + 3 = y"),
            ("k = 15", "15 = k"),
            ("2x + 3y - z = 4", "-z + 2x + 3y = 4"),
            // \dfrac / \tfrac inside roots.
            ("\\sqrt{\\dfrac{3}{2}}", "\\sqrt{\\frac32}"),
            ("\\sqrt{\\tfrac{1}{4}}", "\\frac{1}{2}"),
            // Degrees.
            ("90^\\circ", "90^{\\circ}"),
            ("45", "45^\\circ"),
            ("30°", "30"),
            // Percent.
            ("12.5\\%", "12.5"),
            ("40%", "40\\%"),
            ("50\\%", "0.5"),
            ("12.5\\%", "\\frac{1}{8}"),
            // Intervals with \left( and infinite ends.
            ("\\left( -\\infty, 3 \\right]", "(-\\infty,3]"),
            ("\\left[ 1, 2 \\right)", "[1,2)"),
            ("[-\\infty, 0)", "(-\\infty,0)"),
            // Units inside \text{}.
            ("12\\text{ cm}", "12"),
            ("5\\text{ square units}", "5"),
            ("8 \\mbox{ inches}", "8"),
            ("18 \\text{ integers}\\text{ units}", "18\\text{ integers}"),
            // \pm as a pair, named values in a list, inequalities as intervals, f(x) =.
            ("\\pm 4", "4, -4"),
            ("1 \\pm \\sqrt{2}", "1-\\sqrt2, 1+\\sqrt2"),
            ("a = 1, b = 2", "1, 2"),
            ("45^\\circ, 135^\\circ", "135^\\circ, 45^\\circ"),
            ("x = -2, x = 1", "-2, 1"),
            ("x \\le 2", "(-\\infty, 2]"),
            ("x > -1", "(-1, \\infty)"),
            ("-1 < x \\leq 3", "(-1, 3]"),
            ("5 \\ge x", "(-\\infty, 5]"),
            ("f(x) = x^2 + 1", "x^2+1"),
            // Ratios, decimals at 6 places.
            ("1:2", "\\frac{1}{2}"),
            ("\\frac{6}{23}", "0.26087"),
        ];
        for (a, b) in same {
            assert_eq!(grade_answer(a, b), Grade::Correct, "{a} vs {b}");
            assert_eq!(grade_answer(b, a), Grade::Correct, "{b} vs {a}");
        }
        // An equation answering a value is read by its right side; a gold equation is not.
        for (answer, gold) in [("1 + 2 + 3 = 6", "6"), ("P(A) = \\frac{1}{2}", "0.5"), ("20x + 23y - 69 = 0", "0")] {
            assert_eq!(grade_answer(answer, gold), Grade::Correct, "{answer} for {gold}");
        }
        assert_eq!(grade_answer("x = \\text{9}", "9"), Grade::Wrong, "a text side stays an equation");
        assert_eq!(grade_answer("6", "1 + 2 + 3 = 6"), Grade::Wrong);
        let different = [
            ("-4, 4", "\\{4, 4\\}"),
            ("443_5", "443_7"),
            ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}"),
            ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}"),
            ("\\frac{\\sqrt3}{9}", "\\frac{\\sqrt{3}}{3}"),
            ("5{,}040", "5041"),
            ("\\text{odd}", "\\text{even}"),
            ("x - 3z = 0", "x + 3z = 0"),
            ("x - 3z = 0", "x - 3z = 1"),
            ("(1, 2)", "(2, 1)"),
            ("[1, 2]", "(1, 2]"),
            ("1:2", "2:1"),
            ("\\pm 4", "4"),
            ("7", "7 = 1 + 2 + 3"),
            ("3", "x + 3 = 5"),
            ("x < 2", "(-\\infty, 2]"),
            ("x \\ge 2", "[-2, \\infty)"),
            ("\\frac{1}{3}", "0.33333"),
            // Single letters keep their case (the decompose testbed's nodes are letters).
            ("a", "A"),
        ];
        for (a, b) in different {
            assert_eq!(grade_answer(a, b), Grade::Wrong, "{a} vs {b}");
            assert_eq!(grade_answer(b, a), Grade::Wrong, "{b} vs {a}");
        }
    }

    /// Random and mutated LaTeX: every input gets a verdict, none panics (a deterministic seed).
    #[test]
    fn fuzzed_latex_gets_a_verdict_not_a_panic() {
        use crate::config::AnswerExtraction;
        use crate::task::answer::extract_answer_with;
        const PIECES: &[&str] = &[
            "\\frac",
            "\\dfrac",
            "\\sqrt",
            "\\sqrt[",
            "{",
            "}",
            "(",
            ")",
            "[",
            "]",
            "\\{",
            "\\}",
            "\\left(",
            "\\right)",
            "1",
            "23",
            "-",
            "+",
            "^",
            "_",
            "_{",
            ",",
            "{,}",
            ".",
            "x",
            "=",
            "\\text{",
            "cm}",
            "\\%",
            "^\\circ",
            "$",
            "$$",
            "\\[",
            "\\]",
            "\\(",
            "\\)",
            "\\begin{pmatrix}",
            "\\end{pmatrix}",
            "&",
            "\\\\",
            "\\cup",
            "\\infty",
            "\\pi",
            ":",
            "é",
            "°",
            " ",
            "\\boxed{",
            "\\fbox{",
            "**",
            "answer is ",
            "Final Answer: ",
            "\\sin",
            "\\!",
            "\\,",
            "\\pm",
            "\\le",
            "0",
            "9999999999999999999",
            "\n",
        ];
        let seeds = [
            "\\frac{\\sqrt3}{9}",
            "\\{1, -4\\}",
            "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}",
            "x - 3z = 0",
            "443_{5}",
            "5{,}040",
            "\\left( 1, \\infty \\right)",
            "12\\text{ cm}^2",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let started = Instant::now();
        for round in 0..10_000 {
            let text: String = if round % 2 == 0 {
                (0..1 + next(12)).map(|_| PIECES[next(PIECES.len())]).collect()
            } else {
                // A seed with a piece inserted, one cut, or a character dropped.
                let mut t = seeds[next(seeds.len())].to_string();
                for _ in 0..1 + next(3) {
                    let mut at = next(t.len() + 1);
                    while !t.is_char_boundary(at) {
                        at -= 1;
                    }
                    match next(5) {
                        0 => t.insert_str(at, PIECES[next(PIECES.len())]),
                        1 => t.truncate(at),
                        2 => t.push('é'),
                        3 => {
                            // Two characters swapped: brace counts stay equal, matching breaks.
                            let mut chars: Vec<char> = t.chars().collect();
                            if !chars.is_empty() {
                                let (i, j) = (next(chars.len()), next(chars.len()));
                                chars.swap(i, j);
                            }
                            t = chars.into_iter().collect();
                        }
                        _ => {
                            if at < t.len() {
                                t.remove(at);
                            }
                        }
                    }
                }
                t
            };
            let other = seeds[next(seeds.len())];
            let _ = grade_answer(&text, other);
            let _ = grade_answer(other, &text);
            let _ = grade_answer(&text, &text);
            for how in [AnswerExtraction::Boxed, AnswerExtraction::Stated] {
                let answer = extract_answer_with(&text, how);
                let _ = grade_optional(answer.as_deref(), other);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20), "fuzzing took {:?}", started.elapsed());
    }

    #[test]
    fn a_spent_deadline_gives_up_as_wrong() {
        assert_eq!(grade_with_deadline("2\\sqrt{3}", "\\sqrt{12}", Duration::ZERO), Grade::Wrong);
        // Identical answers need no time.
        assert_eq!(grade_with_deadline("x+1", "x+1", Duration::ZERO), Grade::Correct);
    }

    /// Agreement with the Python oracle math-verify on MATH-500 answers and perturbations of
    /// them (tests/fixtures/grader, regenerated by its script).
    #[test]
    fn agrees_with_math_verify_on_the_fixtures() {
        let text = include_str!("../../../../tests/fixtures/grader/math_verify.jsonl");
        let (mut total, mut agree) = (0usize, 0usize);
        let mut disagreements = Vec::new();
        for line in text.lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let (gold, pred) = (row["gold"].as_str().unwrap(), row["prediction"].as_str().unwrap());
            let oracle = row["math_verify"].as_bool().unwrap();
            let ours = grade_with_deadline(pred, gold, Duration::from_secs(5)) == Grade::Correct;
            total += 1;
            if ours == oracle {
                agree += 1;
            } else {
                disagreements.push(format!("{}: gold {gold:?} prediction {pred:?}: math-verify {oracle}, ours {ours}", row["id"]));
            }
        }
        let rate = agree as f64 / total as f64;
        eprintln!("grader agreement with math-verify: {agree}/{total} = {:.2}%", 100.0 * rate);
        for d in &disagreements {
            eprintln!("  {d}");
        }
        assert!(total >= 500, "{total} fixture pairs");
        assert!(rate >= 0.99, "agreement {rate:.4} below 0.99");
    }

    /// Agreement with math-verify 0.9.0 on whole responses to MATH problems outside MATH-500
    /// (tests/fixtures/grader/math_verify_train.jsonl, made by make_fixtures_train.py): rewrites
    /// of each answer class, wrong answers, several boxes, and answers stated without a box (read
    /// with [`AnswerExtraction::Stated`], as `eval` and `l2t grade` read them).
    #[test]
    fn agrees_with_math_verify_on_math_train_responses() {
        use crate::config::AnswerExtraction;
        use crate::task::answer::extract_answer_with;
        let text = include_str!("../../../../tests/fixtures/grader/math_verify_train.jsonl");
        let started = Instant::now();
        let mut tally = std::collections::BTreeMap::<&str, (usize, usize)>::new();
        let mut disagreements = Vec::new();
        for line in text.lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let (gold, response) = (row["gold"].as_str().unwrap(), row["prediction"].as_str().unwrap());
            let oracle = row["math_verify"].as_bool().unwrap();
            let answer = extract_answer_with(response, AnswerExtraction::Stated);
            let ours = grade_optional(answer.as_deref(), gold) == Grade::Correct;
            for key in [if row["boxed"].as_bool().unwrap() { "boxed" } else { "unboxed" }, "all"] {
                let t = tally.entry(key).or_default();
                t.0 += 1;
                t.1 += usize::from(ours == oracle);
            }
            if ours != oracle {
                disagreements.push(format!("{}: gold {gold:?} answer {answer:?}: math-verify {oracle}, ours {ours}", row["id"]));
            }
        }
        let elapsed = started.elapsed();
        for (key, (n, agree)) in &tally {
            eprintln!("math_train agreement with math-verify, {key}: {agree}/{n} = {:.2}%", 100.0 * *agree as f64 / *n as f64);
        }
        eprintln!("graded in {elapsed:?}");
        for d in &disagreements {
            eprintln!("  {d}");
        }
        let rate = |key: &str| tally.get(key).map_or(0.0, |&(n, a)| a as f64 / n as f64);
        assert!(tally["all"].0 >= 3000, "{} fixture pairs", tally["all"].0);
        assert!(rate("boxed") >= 0.99, "boxed agreement {:.4} below 0.99", rate("boxed"));
        assert!(rate("all") >= 0.97, "overall agreement {:.4} below 0.97", rate("all"));
    }
}
