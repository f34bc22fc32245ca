//! Reading a response's final answer: the last `\\boxed{}` (the RL reward's reading), else the
//! last stated answer as math-verify reads free text (`eval`'s default reading). The grader
//! ([`super::grade`]) then compares it with the gold answer.

use crate::config::AnswerExtraction;
use crate::task::{BOXED_OPEN, THINK_CLOSE};

/// Byte range `[body, close)` of the contents of the box whose `{` is at `open - 1`, with brace
/// matching: `close` is the offset of the matching `}`.
fn boxed_span(text: &str, body: usize) -> Option<(usize, usize)> {
    let mut depth = 1usize;
    for (i, c) in text[body..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((body, body + i));
                }
            }
            _ => {}
        }
    }
    None
}

/// `\fbox{}` is read as a box too (math-verify does).
const FBOX_OPEN: &str = "\\fbox{";

/// The span of the last complete `\boxed{}` (or `\fbox{}`) of `text`.
pub(crate) fn last_boxed_span(text: &str) -> Option<(usize, usize)> {
    let opens = text.match_indices(BOXED_OPEN).map(|(i, o)| i + o.len()).chain(text.match_indices(FBOX_OPEN).map(|(i, o)| i + o.len()));
    opens.filter_map(|body| boxed_span(text, body)).max_by_key(|&(body, _)| body)
}

/// Where the final answer is looked for: after the first `</think>`, or the whole text.
pub(crate) fn answer_region(text: &str) -> usize {
    text.find(THINK_CLOSE).map_or(0, |p| p + THINK_CLOSE.len())
}

/// The final answer: the last complete `\boxed{}` (or `\fbox{}`) after the first `</think>`; a
/// response with no `</think>` falls back to the last complete box anywhere in it.
pub fn extract_answer(text: &str) -> Option<String> {
    final_boxed(&text[answer_region(text)..])
}

/// The final answer as `how` reads it: the box, and with [`AnswerExtraction::Stated`], when there
/// is none, the last stated answer ([`last_stated`]).
pub fn extract_answer_with(text: &str, how: AnswerExtraction) -> Option<String> {
    let region = &text[answer_region(text)..];
    match how {
        AnswerExtraction::Boxed => final_boxed(region),
        AnswerExtraction::Stated => final_boxed(region).or_else(|| braceless_box(region)).or_else(|| last_stated(region)),
    }
}

/// The last box of a response, with the boxes listed just before it (`$\boxed{1}$ and
/// $\boxed{-2}$` is the list `1, -2`, as math-verify reads it).
fn final_boxed(text: &str) -> Option<String> {
    let opens = |t: &str| -> Vec<usize> {
        let mut v: Vec<usize> =
            t.match_indices(BOXED_OPEN).map(|(i, o)| i + o.len()).chain(t.match_indices(FBOX_OPEN).map(|(i, o)| i + o.len())).collect();
        v.sort_unstable();
        v
    };
    let spans: Vec<(usize, usize)> = opens(text).into_iter().filter_map(|body| boxed_span(text, body)).collect();
    let &(from, to) = spans.iter().max_by_key(|s| s.0)?;
    let mut items = vec![text[from..to].trim().to_string()];
    let mut start = from;
    for &(f, t) in spans.iter().rev() {
        if t >= start || items.len() >= 6 {
            continue;
        }
        // What lies between this box's `}` and the next box's command.
        let head = text[..start].rfind('\\').unwrap_or(start);
        let between = text.get(t + 1..head).unwrap_or("x").replace('$', "");
        if !matches!(between.trim(), "," | "and" | ",and" | ", and" | "or" | ",or" | ", or") {
            break;
        }
        items.push(text[f..t].trim().to_string());
        start = f;
    }
    items.reverse();
    Some(items.join(", "))
}

/// `\boxed 7`: a box without braces holds the next word.
fn braceless_box(text: &str) -> Option<String> {
    let at = text.rfind("\\boxed ")?;
    let rest = text[at + "\\boxed ".len()..].trim_start();
    let word = &rest[..rest.find(|c: char| c.is_whitespace() || c == '$').unwrap_or(rest.len())];
    let word = word.trim_end_matches(['.', ',']);
    (!word.is_empty()).then(|| word.to_string())
}

/// The contents of the last complete `\boxed{}` of `text` (braces matched), trimmed.
pub fn last_boxed(text: &str) -> Option<String> {
    last_boxed_span(text).map(|(from, to)| text[from..to].trim().to_string())
}

/// The answer a response states without a box, in math-verify's order of preference: after
/// "final answer" .. "is", then after "answer" (a formula or number starting within 50
/// characters), then the last formula (`$..$`, `$$..$$`, `\[..\]`, `\(..\)`, a bare
/// `\frac{a}{b}`) or number of the text. Within each, the one that ends last wins (so "the answer
/// is $5$, in 3 steps" reads 3, as math-verify reads it).
pub fn last_stated(text: &str) -> Option<String> {
    let candidates = stated_candidates(text);
    let lower = text.to_ascii_lowercase();
    let anchored = |anchor: &str, reach: usize| -> Option<String> {
        let mut best: Option<&(usize, usize, String, bool)> = None;
        for (at, _) in lower.match_indices(anchor) {
            let from = at + anchor.len();
            // The first formula in reach, and the number after the last `=` within 100 characters,
            // else the first number in reach (math-verify's patterns).
            let formula = candidates.iter().find(|c| !c.3 && c.0 >= from && c.0 <= from + reach);
            let window = &text[from..floor_char_boundary(text, from + 100)];
            let after_equals = window.rfind('=').and_then(|e| {
                let at = from + e + 1;
                let at = at + (text[at..].len() - text[at..].trim_start().len());
                candidates.iter().find(|c| c.3 && c.0 == at && !text[c.1..].trim_start().starts_with('='))
            });
            let number = after_equals.or_else(|| candidates.iter().find(|c| c.3 && c.0 >= from && c.0 <= from + reach + 1));
            for c in [formula, number].into_iter().flatten() {
                if best.is_none_or(|b| c.1 > b.1) {
                    best = Some(c);
                }
            }
        }
        best.map(|c| c.2.clone())
    };
    // "final answer is", "The final answer to the question is" (at most 100 characters between).
    let final_is = {
        let mut best: Option<&(usize, usize, String, bool)> = None;
        for (at, _) in lower.match_indices("final answer") {
            let window_end = floor_char_boundary(&lower, at + 12 + 100 + 3);
            let Some(is_at) = lower[at + 12..window_end].find(" is").map(|i| at + 12 + i + 3) else { continue };
            let rest = &text[is_at..];
            let skip = rest.len() - rest.trim_start_matches([':', ' ', '\n', '\t']).len();
            if let Some(c) = candidates.iter().find(|c| c.0 == is_at + skip) {
                if best.is_none_or(|b| c.1 > b.1) {
                    best = Some(c);
                }
            }
        }
        best.map(|c| c.2.clone())
    };
    final_is
        .or_else(|| anchored("answer:", 50))
        .or_else(|| anchored("answer", 50))
        .or_else(|| candidates.iter().max_by_key(|c| c.1).map(|c| c.2.clone()))
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The number that starts at `i` as math-verify reads it: thousands groups (`1,234.5`), else
/// digits with a decimal point or comma (`1,3` is 1.3), then `/` and a denominator; (end, text).
fn plain_number(text: &str, i: usize) -> (usize, String) {
    let bytes = text.as_bytes();
    let digits_from = |k: usize| (k..text.len()).find(|&m| !bytes[m].is_ascii_digit()).unwrap_or(text.len());
    let start = i + usize::from(bytes[i] == b'-');
    let mut j = digits_from(start);
    let mut number = text[i..j].to_string();
    let lead = j - start;
    // Thousands: 1 to 3 leading digits (not 0), then groups of exactly 3.
    let mut grouped = false;
    if (1..=3).contains(&lead) && bytes[start] != b'0' {
        while j + 4 <= text.len() && bytes[j] == b',' && digits_from(j + 1) == j + 4 {
            number.push_str(&text[j + 1..j + 4]);
            j += 4;
            grouped = true;
        }
    }
    if j + 1 < text.len() && (bytes[j] == b'.' || (bytes[j] == b',' && !grouped)) && bytes[j + 1].is_ascii_digit() {
        let end = digits_from(j + 1);
        number.push('.');
        number.push_str(&text[j + 1..end]);
        j = end;
    }
    if j + 1 < text.len() && bytes[j] == b'/' && bytes[j + 1].is_ascii_digit() {
        let end = digits_from(j + 1);
        number.push_str(&text[j..end]);
        j = end;
    }
    (j, number)
}

/// Formulas and plain numbers of `text`: (start, end, contents, is a plain number), in order of
/// start.
fn stated_candidates(text: &str) -> Vec<(usize, usize, String, bool)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let escaped = i > 0 && bytes[i - 1] == b'\\';
        let rest = &text[i..];
        let delimited = if rest.starts_with("$$") && !escaped {
            rest[2..].find("$$").map(|j| (2, 2 + j, 2 + j + 2))
        } else if rest.starts_with('$') && !escaped {
            // Inline: on one line, and not a `\$`.
            let body = &rest[1..];
            let mut end = None;
            let mut prev = b' ';
            for (j, b) in body.bytes().enumerate() {
                if b == b'\n' {
                    break;
                }
                if b == b'$' && prev != b'\\' {
                    end = Some(j);
                    break;
                }
                prev = b;
            }
            end.filter(|&j| j > 0).map(|j| (1, 1 + j, 1 + j + 1))
        } else if let Some(inner) = rest.strip_prefix("\\[") {
            inner.find("\\]").map(|j| (2, 2 + j, 2 + j + 2))
        } else if let Some(inner) = rest.strip_prefix("\\(") {
            inner.find("\\)").filter(|&j| !inner[..j].contains('\n')).map(|j| (2, 2 + j, 2 + j + 2))
        } else if rest.starts_with("\\frac{") || rest.starts_with("-\\frac{") {
            // A bare fraction of two plain numbers.
            let rest = rest.strip_prefix('-').unwrap_or(rest);
            let simple = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b',' || b == b'-');
            rest[6..].find('}').and_then(|a| {
                let den = rest[6 + a + 1..].strip_prefix('{')?;
                let b = den.find('}')?;
                let sign = usize::from(text[i..].starts_with('-'));
                (simple(&rest[6..6 + a]) && simple(&den[..b])).then_some((0, sign + 6 + a + 2 + b + 1, sign + 6 + a + 2 + b + 1))
            })
        } else {
            None
        };
        if let Some((from, to, end)) = delimited {
            let body = rest[from..to].trim().trim_end_matches(['.', ',']).trim();
            if !body.is_empty() {
                out.push((i, i + end, body.to_string(), false));
            }
            i += end;
            continue;
        }
        i += 1;
    }
    // Plain numbers, inside formulas too: after the start, a space, `=` or `**` (a `$` after a
    // space is a currency sign).
    let mut i = 0;
    while i < text.len() {
        let c = bytes[i];
        let anchored = i == 0
            || matches!(bytes[i - 1], b' ' | b'\n' | b'\t' | b'=' | b'*')
            || (bytes[i - 1] == b'$' && (i == 1 || bytes[i - 2].is_ascii_whitespace()));
        if anchored && (c.is_ascii_digit() || (c == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))) {
            let (j, number) = plain_number(text, i);
            out.push((i, j, number, true));
            i = j;
        } else {
            i += 1;
        }
    }
    out.sort_by_key(|c| c.0);
    join_listed_formulas(text, out)
}

/// Formulas joined by `,`, `and` or `or` (`$1$ and $2$`, up to six) are one answer, a list, as
/// math-verify reads them.
fn join_listed_formulas(text: &str, candidates: Vec<(usize, usize, String, bool)>) -> Vec<(usize, usize, String, bool)> {
    let mut out: Vec<(usize, usize, String, bool)> = Vec::with_capacity(candidates.len());
    let mut joined = 0;
    for c in candidates {
        let last_formula = out.iter().rposition(|f| !f.3);
        if let (false, Some(k)) = (c.3, last_formula) {
            let between = text.get(out[k].1..c.0).unwrap_or("x").trim();
            let connector = matches!(between, "," | "and" | ",and" | ", and" | "or" | ",or" | ", or");
            if connector && c.0 >= out[k].1 && joined < 5 {
                let f = &mut out[k];
                f.1 = c.1;
                f.2 = format!("{}, {}", f.2, c.2);
                joined += 1;
                continue;
            }
        }
        if !c.3 {
            joined = 0;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_extraction_matches_braces_and_prefers_after_think() {
        assert_eq!(extract_answer("\\boxed{\\frac{1}{2}}").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract_answer("\\boxed{1}</think>\\boxed{2}").as_deref(), Some("2"));
        assert_eq!(extract_answer("\\boxed{1}</think>none").as_deref(), None);
        assert_eq!(extract_answer("\\boxed{12").as_deref(), None);
    }

    #[test]
    fn fbox_is_a_box_and_the_last_box_wins() {
        assert_eq!(extract_answer("so $\\fbox{12}$").as_deref(), Some("12"));
        assert_eq!(extract_answer("$\\fbox{1}$ then $\\boxed{2}$").as_deref(), Some("2"));
        assert_eq!(extract_answer("$\\boxed{1}$ then $\\fbox{2}$").as_deref(), Some("2"));
        assert_eq!(extract_answer("the answer is $3125$"), None, "no box, no answer for the reward");
        assert_eq!(extract_answer("so $x = \\boxed{1}$ and $\\boxed{-2}$").as_deref(), Some("1, -2"), "listed boxes");
        assert_eq!(extract_answer("$\\boxed{1}$, wrong; so $\\boxed{2}$").as_deref(), Some("2"));
    }
}
