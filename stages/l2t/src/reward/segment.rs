//! Episodes and the outcome reward (l2t-spec sections 2 and 3).
//!
//! Episodes are token spans that partition a response. Boundaries are found in the response text
//! and mapped to tokens through each token's character span (from decoding the response's own
//! token ids, never by re-tokenizing), so a boundary always falls on a token of the response.
//!
//! Rule `tags` (documented behaviour for imperfect responses):
//! - the reasoning region runs from the first `<think>` (or the start) to the first `</think>`
//!   (or the end); only `<episode_N>` tags inside it open episodes;
//! - an `<episode_N>` seen while another episode is open (nesting) is content, not a boundary;
//!   a closing tag that matches nothing, an unclosed episode, or numbers out of order make the
//!   response not `well_formed` but keep its boundaries;
//! - tokens before the first episode join it; `</think>` and the answer join the last episode;
//! - no parseable episode: one episode over the whole response, `format_ok = false`.

use crate::config::AnswerExtraction;
use crate::config::Rule;
use crate::table::rollouts::FinishReason;
use crate::task::grade::{grade_optional, Grade};
use crate::task::{BOXED_OPEN, THINK_CLOSE, THINK_OPEN};

/// Paragraph openings that start a new episode under [`Rule::Paragraphs`].
pub const PARAGRAPH_CUES: &[&str] =
    &["Wait", "Alternatively", "But let me double-check", "Let me double-check", "Let me check", "Let me verify", "Hmm", "Actually"];

/// Episodes of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Segmentation {
    /// Token spans `[start, end)`, in order, partitioning `[0, n_tokens)`.
    pub spans: Vec<(usize, usize)>,
    /// At least one parseable episode (always true for rules other than `tags`).
    pub format_ok: bool,
    /// The strict format: think block closed, episodes numbered 1..K, balanced, not nested, and
    /// exactly one `\boxed{}` after `</think>`.
    pub well_formed: bool,
}

/// Character end offset of every token, from each token's decoded piece: `ends[t]` is the length
/// of the text of tokens `0..=t`.
pub fn token_char_ends(pieces: &[String]) -> Vec<usize> {
    pieces
        .iter()
        .scan(0usize, |acc, p| {
            *acc += p.len();
            Some(*acc)
        })
        .collect()
}

/// Byte range of the text of tokens `[start, end)`.
pub fn span_bytes(ends: &[usize], (start, end): (usize, usize)) -> (usize, usize) {
    let at = |t: usize| if t == 0 { 0 } else { ends[t - 1] };
    (at(start), at(end))
}

/// The token holding byte `pos` of the text (the first token whose end is past it).
fn token_at(ends: &[usize], pos: usize) -> usize {
    ends.partition_point(|&e| e <= pos).min(ends.len().saturating_sub(1))
}

/// Turns episode-start byte offsets into a token partition.
fn spans_from_starts(ends: &[usize], starts: &[usize]) -> Vec<(usize, usize)> {
    let n = ends.len();
    let mut bounds: Vec<usize> = vec![0];
    for &s in starts.iter().skip(1) {
        let t = token_at(ends, s);
        if t > *bounds.last().expect("bounds start non-empty") && t < n {
            bounds.push(t);
        }
    }
    bounds.iter().enumerate().map(|(i, &b)| (b, bounds.get(i + 1).copied().unwrap_or(n))).collect()
}

pub fn segment(rule: Rule, text: &str, ends: &[usize]) -> Segmentation {
    match rule {
        Rule::Tags => segment_tags(text, ends),
        Rule::Paragraphs => segment_paragraphs(text, ends),
        Rule::Chunks(size) => segment_chunks(ends.len(), size, text),
    }
}

/// Parses `<episode_N>` / `</episode_N>` at `pos`: (is_close, N, tag length).
fn episode_tag(text: &str, pos: usize) -> Option<(bool, usize, usize)> {
    let rest = &text[pos..];
    let (close, body) = if let Some(b) = rest.strip_prefix("</episode_") { (true, b) } else { (false, rest.strip_prefix("<episode_")?) };
    let digits = body.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || body.as_bytes().get(digits) != Some(&b'>') {
        return None;
    }
    let n = body[..digits].parse().ok()?;
    Some((close, n, rest.len() - body.len() + digits + 1))
}

/// Byte offset of the `</think>` that closes the reasoning region (after the first `<think>`).
fn think_close(text: &str) -> Option<usize> {
    let region_start = text.find(THINK_OPEN).map_or(0, |p| p + THINK_OPEN.len());
    text[region_start..].find(THINK_CLOSE).map(|p| p + region_start)
}

/// Tokens of the reasoning itself: those before the token where the response closes its
/// reasoning (`</think>`), or the first `limit` tokens when it never does. `J` cuts the reasoning
/// here at the latest, so the forced `close` suffix is never appended after the model's own.
pub fn reasoning_tokens(text: &str, ends: &[usize], limit: usize) -> usize {
    think_close(text).map_or(limit, |p| token_at(ends, p).min(limit))
}

pub fn segment_tags(text: &str, ends: &[usize]) -> Segmentation {
    let think_open = text.find(THINK_OPEN);
    let region_start = think_open.map_or(0, |p| p + THINK_OPEN.len());
    let think_close = think_close(text);
    let region_end = think_close.unwrap_or(text.len());
    let mut starts = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut ordered = true;
    let mut balanced = true;
    let mut pos = region_start;
    while let Some(off) = text[pos..region_end].find('<') {
        let at = pos + off;
        match episode_tag(text, at) {
            Some((false, n, len)) => {
                if open.is_empty() {
                    starts.push(at);
                    ordered &= n == starts.len();
                } else {
                    balanced = false;
                }
                open.push(n);
                pos = at + len;
            }
            Some((true, n, len)) => {
                balanced &= open.pop() == Some(n);
                pos = at + len;
            }
            None => pos = at + 1,
        }
    }
    balanced &= open.is_empty();
    if starts.is_empty() || ends.is_empty() {
        return Segmentation { spans: vec![(0, ends.len())], format_ok: false, well_formed: false };
    }
    let boxed_after_think = think_close.map_or(0, |c| text[c..].matches(BOXED_OPEN).count());
    let well_formed = think_open.is_some() && think_close.is_some() && balanced && ordered && boxed_after_think == 1;
    Segmentation { spans: spans_from_starts(ends, &starts), format_ok: true, well_formed }
}

pub fn segment_paragraphs(text: &str, ends: &[usize]) -> Segmentation {
    let mut starts = vec![0];
    let mut search = 0;
    while let Some(off) = text[search..].find("\n\n") {
        let mut p = search + off;
        while text[p..].starts_with('\n') {
            p += 1;
        }
        let para = text[p..].trim_start();
        if PARAGRAPH_CUES.iter().any(|cue| para.starts_with(cue)) {
            starts.push(p);
        }
        search = p;
    }
    let well_formed = extract_answer(text).is_some();
    Segmentation { spans: spans_from_starts(ends, &starts), format_ok: true, well_formed }
}

pub fn segment_chunks(n_tokens: usize, size: usize, text: &str) -> Segmentation {
    let spans = (0..n_tokens.max(1)).step_by(size).map(|s| (s, (s + size).min(n_tokens))).collect();
    Segmentation { spans, format_ok: true, well_formed: extract_answer(text).is_some() }
}

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
fn last_boxed_span(text: &str) -> Option<(usize, usize)> {
    let opens = text.match_indices(BOXED_OPEN).map(|(i, o)| i + o.len()).chain(text.match_indices(FBOX_OPEN).map(|(i, o)| i + o.len()));
    opens.filter_map(|body| boxed_span(text, body)).max_by_key(|&(body, _)| body)
}

/// Where the final answer is looked for: after the first `</think>`, or the whole text.
fn answer_region(text: &str) -> usize {
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

/// Tokens up to and including the one holding the `}` that closes the final answer (the one
/// [`extract_answer`] reads), or `None` without a final answer. A response cut after this many
/// tokens still gives the same final answer, which is how `eval` tells that a response answered
/// within a token budget although it ran on past it.
pub fn answer_tokens(text: &str, ends: &[usize]) -> Option<usize> {
    let from = answer_region(text);
    let (_, close) = last_boxed_span(&text[from..])?;
    Some(token_at(ends, from + close) + 1)
}

/// Outcome of one rollout (l2t-spec section 3).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub answer: Option<String>,
    pub grade: Grade,
    /// The gold answer is unparsable: the prompt takes no part in training.
    pub excluded: bool,
    /// The answer equals the gold answer and the rollout was not truncated. Accuracy counts this,
    /// not `r_out >= 1`, which the format penalty would turn false for a correct answer.
    pub correct: bool,
    /// r_out in {0, 1} plus the format penalty when `format_ok` is false.
    pub r_out: f32,
}

/// A rollout solved its problem: its answer is graded correct and it was not truncated (spec 3).
pub fn solved(graded_correct: bool, finish: FinishReason) -> bool {
    graded_correct && finish == FinishReason::Stop
}

/// `r_out = 1` iff the answer equals the gold answer and the rollout was not truncated.
pub fn outcome_reward(text: &str, gold: &str, finish: FinishReason, format_ok: bool, format_penalty: f64) -> Outcome {
    outcome_reward_with(text, gold, finish, format_ok, format_penalty, AnswerExtraction::Boxed)
}

/// [`outcome_reward`] with the answer read as `how` reads it (`eval.answer`).
pub fn outcome_reward_with(
    text: &str,
    gold: &str,
    finish: FinishReason,
    format_ok: bool,
    format_penalty: f64,
    how: AnswerExtraction,
) -> Outcome {
    let answer = extract_answer_with(text, how);
    let grade = grade_optional(answer.as_deref(), gold);
    let correct = solved(grade == Grade::Correct, finish);
    let penalty = if format_ok { 0.0 } else { format_penalty };
    Outcome { answer, grade, excluded: grade == Grade::GoldUnparsable, correct, r_out: (f64::from(u8::from(correct)) + penalty) as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character: spans in tokens equal spans in characters.
    fn char_ends(text: &str) -> Vec<usize> {
        (1..=text.len()).collect()
    }

    fn texts<'a>(text: &'a str, seg: &Segmentation) -> Vec<&'a str> {
        seg.spans.iter().map(|&(s, e)| &text[s..e]).collect()
    }

    fn assert_partition(seg: &Segmentation, n: usize) {
        assert_eq!(seg.spans.first().unwrap().0, 0);
        assert_eq!(seg.spans.last().unwrap().1, n);
        for w in seg.spans.windows(2) {
            assert_eq!(w[0].1, w[1].0);
            assert!(w[0].0 < w[0].1);
        }
    }

    const GOOD: &str = "<think><episode_1>2 + 3 = 5</episode_1><episode_2>5 * 2 = 10</episode_2></think>\\boxed{10}";

    #[test]
    fn reasoning_stops_at_the_token_that_closes_it() {
        let pieces: Vec<String> = ["<think>", "a", "b", "</think>", "\\boxed{", "3", "}"].iter().map(|p| p.to_string()).collect();
        let text = pieces.concat();
        assert_eq!(reasoning_tokens(&text, &token_char_ends(&pieces), 7), 3);
        assert_eq!(reasoning_tokens(&text, &token_char_ends(&pieces), 2), 2);
        let open: Vec<String> = ["<think>", "a", "b"].iter().map(|p| p.to_string()).collect();
        assert_eq!(reasoning_tokens(&open.concat(), &token_char_ends(&open), 3), 3);
    }

    #[test]
    fn answer_ends_at_the_token_that_closes_the_final_box() {
        // Tokens:  0         1    2           3          4   5     6   7       8    9
        let pieces: Vec<String> = ["<think>", "a", "\\boxed{1}", "</think>", "\\", "boxed{", "2", "} ok", " \\boxed{", "3"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let text = pieces.concat();
        let ends = token_char_ends(&pieces);
        // The final answer is `2` (the box after `</think>`; `\boxed{3` never closes), closed in token 7.
        assert_eq!(extract_answer(&text).as_deref(), Some("2"));
        assert_eq!(answer_tokens(&text, &ends), Some(8));
        // Nothing after `</think>`: no final answer, whatever the reasoning boxed.
        let open: Vec<String> = ["<think>", "\\boxed{1}", "</think>", "so"].iter().map(|p| p.to_string()).collect();
        assert_eq!(answer_tokens(&open.concat(), &token_char_ends(&open)), None);
        // No `</think>`: the last complete box anywhere, here closed in token 1.
        let bare: Vec<String> = ["\\boxed{4", "}", " done"].iter().map(|p| p.to_string()).collect();
        assert_eq!(answer_tokens(&bare.concat(), &token_char_ends(&bare)), Some(2));
    }

    #[test]
    fn well_formed_response() {
        let seg = segment_tags(GOOD, &char_ends(GOOD));
        assert_partition(&seg, GOOD.len());
        assert!(seg.format_ok && seg.well_formed);
        assert_eq!(texts(GOOD, &seg), ["<think><episode_1>2 + 3 = 5</episode_1>", "<episode_2>5 * 2 = 10</episode_2></think>\\boxed{10}"]);
        let out = outcome_reward(GOOD, "10", FinishReason::Stop, seg.format_ok, -0.01);
        assert_eq!((out.answer.as_deref(), out.grade, out.r_out), (Some("10"), Grade::Correct, 1.0));
    }

    #[test]
    fn missing_tags_is_one_episode_with_penalty() {
        let text = "<think>2 + 3 = 5, then 10</think>\\boxed{10}";
        let seg = segment_tags(text, &char_ends(text));
        assert_eq!(seg.spans, vec![(0, text.len())]);
        assert!(!seg.format_ok && !seg.well_formed);
        let out = outcome_reward(text, "10", FinishReason::Stop, seg.format_ok, -0.01);
        assert_eq!(out.r_out, 0.99);
        // The penalty lowers the reward, not the verdict: the answer is still correct.
        assert!(out.correct);
        let wrong = outcome_reward(text, "11", FinishReason::Stop, false, -0.01);
        assert_eq!((wrong.r_out, wrong.correct), (-0.01, false));
    }

    #[test]
    fn nested_tags_are_content() {
        let text = "<think><episode_1>a<episode_2>b</episode_2>c</episode_1><episode_2>d</episode_2></think>\\boxed{1}";
        let seg = segment_tags(text, &char_ends(text));
        assert_partition(&seg, text.len());
        assert_eq!(
            texts(text, &seg),
            ["<think><episode_1>a<episode_2>b</episode_2>c</episode_1>", "<episode_2>d</episode_2></think>\\boxed{1}"]
        );
        assert!(seg.format_ok && !seg.well_formed);
    }

    #[test]
    fn unclosed_tags_keep_their_boundaries() {
        let text = "<think><episode_1>a<episode_2>b</think>\\boxed{1}";
        let seg = segment_tags(text, &char_ends(text));
        // <episode_2> is nested inside the unclosed episode 1, so one episode.
        assert_eq!(seg.spans.len(), 1);
        assert!(seg.format_ok && !seg.well_formed);
        let text = "<think><episode_1>a</episode_1><episode_2>b";
        let seg = segment_tags(text, &char_ends(text));
        assert_eq!(texts(text, &seg), ["<think><episode_1>a</episode_1>", "<episode_2>b"]);
        assert!(!seg.well_formed);
        assert_eq!(outcome_reward(text, "1", FinishReason::Length, true, -0.01).grade, Grade::Unparsable);
    }

    #[test]
    fn text_before_first_episode_joins_it_and_tags_after_think_are_ignored() {
        let text = "ok <think>x<episode_1>a</episode_1></think><episode_2>z</episode_2>\\boxed{3}";
        let seg = segment_tags(text, &char_ends(text));
        assert_eq!(seg.spans, vec![(0, text.len())]);
        assert!(seg.format_ok);
    }

    #[test]
    fn no_answer_and_two_answers() {
        let text = "<think><episode_1>a</episode_1></think>";
        let seg = segment_tags(text, &char_ends(text));
        assert!(seg.format_ok && !seg.well_formed);
        let out = outcome_reward(text, "3", FinishReason::Stop, true, -0.01);
        assert_eq!((out.answer, out.grade, out.r_out), (None, Grade::Unparsable, 0.0));

        let text = "<think><episode_1>a</episode_1></think>\\boxed{4} so \\boxed{3}";
        let seg = segment_tags(text, &char_ends(text));
        assert!(seg.format_ok && !seg.well_formed);
        let out = outcome_reward(text, "3", FinishReason::Stop, true, -0.01);
        assert_eq!((out.answer.as_deref(), out.grade), (Some("3"), Grade::Correct));
    }

    #[test]
    fn truncated_rollout_gets_zero_and_unparsable_gold_is_excluded() {
        let truncated = outcome_reward(GOOD, "10", FinishReason::Length, true, -0.01);
        assert_eq!((truncated.grade, truncated.correct, truncated.r_out), (Grade::Correct, false, 0.0));
        let out = outcome_reward(GOOD, "\\frac{1}{", FinishReason::Stop, true, -0.01);
        assert!(out.excluded && !out.correct);
        assert_eq!(out.r_out, 0.0);
    }

    #[test]
    fn answer_extraction_matches_braces_and_prefers_after_think() {
        assert_eq!(extract_answer("\\boxed{\\frac{1}{2}}").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract_answer("\\boxed{1}</think>\\boxed{2}").as_deref(), Some("2"));
        assert_eq!(extract_answer("\\boxed{1}</think>none").as_deref(), None);
        assert_eq!(extract_answer("\\boxed{12").as_deref(), None);
    }

    #[test]
    fn boundaries_follow_multi_character_tokens() {
        // Tokens: "<think>", "<episode_1>", "a", "</episode_1>", "<episode_2>", "b", "</episode_2>", "</think>"
        let pieces: Vec<String> = ["<think>", "<episode_1>", "a", "</episode_1>", "<epi", "sode_2>b", "</episode_2>", "</think>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let text: String = pieces.concat();
        let seg = segment_tags(&text, &token_char_ends(&pieces));
        assert_eq!(seg.spans, vec![(0, 4), (4, 8)]);
    }

    #[test]
    fn paragraphs_split_at_reflection_cues() {
        let text = "First step.\n\nSecond step.\n\nWait, check it.\n\nAlternatively do this.\n\\boxed{1}";
        let seg = segment_paragraphs(text, &char_ends(text));
        assert_partition(&seg, text.len());
        assert_eq!(texts(text, &seg), ["First step.\n\nSecond step.\n\n", "Wait, check it.\n\n", "Alternatively do this.\n\\boxed{1}"]);
        assert!(seg.well_formed);
    }

    #[test]
    fn chunks_are_fixed_spans() {
        let seg = segment_chunks(10, 4, "");
        assert_eq!(seg.spans, vec![(0, 4), (4, 8), (8, 10)]);
        assert!(!seg.well_formed);
    }

    #[test]
    fn spans_partition_damaged_responses_under_every_rule() {
        use rand::{Rng, SeedableRng};
        let cfg = crate::config::TaskConfig { n_train: 50, n_eval: 1, ..Default::default() };
        let rows = crate::task::generate(&cfg, 1).unwrap().train;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for row in &rows {
            let full = row.solution.clone().unwrap();
            // Truncate anywhere and cut out a random slice: unclosed, missing and broken tags.
            let cut = rng.random_range(1..=full.len());
            let (a, b) = (rng.random_range(0..cut), rng.random_range(0..cut));
            let text = format!("{}{}", &full[..a.min(b)], &full[a.max(b)..cut]);
            // Tokens of 1 to 4 bytes.
            let mut ends = Vec::new();
            let mut pos = 0;
            while pos < text.len() {
                pos = (pos + rng.random_range(1..=4)).min(text.len());
                ends.push(pos);
            }
            for rule in [Rule::Tags, Rule::Paragraphs, Rule::Chunks(3)] {
                let seg = segment(rule, &text, &ends);
                if ends.is_empty() {
                    continue;
                }
                assert_partition(&seg, ends.len());
            }
        }
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

    /// Without a box, `stated` reads the answer as math-verify does; `boxed` reads none.
    #[test]
    fn the_last_stated_answer_without_a_box() {
        for (text, want) in [
            ("We add them, so the answer is $3125$.", "3125"),
            ("Thus the answer is 42.", "42"),
            ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
            ("The final answer to the problem is $7$, as computed with 3 steps.", "7"),
            ("**Answer:** $x = 5$", "x = 5"),
            ("The answer is **17**.", "17"),
            ("First $2$, then\n\\[\n\\frac{3}{4}\n\\]", "\\frac{3}{4}"),
            ("We find $a$ first and then $b+1$.", "b+1"),
            ("Answer: \\(3\\sqrt{2}\\)", "3\\sqrt{2}"),
            ("Hence $$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$$", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
            ("The answer is \\frac{160}{33}.", "\\frac{160}{33}"),
            ("The roots are $1$ and $-2$.", "1, -2"),
            ("So the answer is **\\frac{1}{5}, -\\frac{1}{3}**.", "\\frac{1}{5}, -\\frac{1}{3}"),
            ("It costs $1,234.50 in all, so the answer is 1,234.5", "1234.5"),
            // math-verify's reading: the formula or number after "answer" that ends last.
            ("So the answer is $\\frac{2807}{27}$. Checking: all 3 cases work.", "3"),
            ("So the answer is $-3$. Checking: all 3 cases work.", "-3"),
            ("<think>the answer is $1$</think> so it is $2$", "2"),
        ] {
            assert_eq!(extract_answer_with(text, AnswerExtraction::Stated).as_deref(), Some(want), "{text:?}");
            assert_eq!(extract_answer_with(text, AnswerExtraction::Boxed), None, "{text:?}");
        }
        assert_eq!(
            extract_answer_with("the answer is $\\boxed{4}$, not $5$", AnswerExtraction::Stated).as_deref(),
            Some("4"),
            "a box first"
        );
        assert_eq!(extract_answer_with("no answer here", AnswerExtraction::Stated), None);
        assert_eq!(extract_answer_with("We get $\\boxed 7$.", AnswerExtraction::Stated).as_deref(), Some("7"), "a box without braces");
        assert_eq!(extract_answer_with("", AnswerExtraction::Stated), None);
        let out = outcome_reward_with("so the answer is $10$.", "10", FinishReason::Stop, true, 0.0, AnswerExtraction::Stated);
        assert!(out.correct);
        assert_eq!(
            outcome_reward("so the answer is $10$.", "10", FinishReason::Stop, true, 0.0).grade,
            Grade::Unparsable,
            "the reward needs a box"
        );
    }
}
