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
use crate::table::episodes::EpisodeRow;
use crate::table::rollouts::FinishReason;
use crate::task::answer::{answer_region, extract_answer, extract_answer_with, last_boxed_span};
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

/// The rollout of an episode row solved its problem, as `Outcome::correct` decided it (from the
/// grade, never from `r_out`, which the format penalty lowers); `finish` is the rollout's.
pub fn episode_solved(episode: &EpisodeRow, finish: FinishReason) -> bool {
    solved(episode.grade == Grade::Correct.as_str(), finish)
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
