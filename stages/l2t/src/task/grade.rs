//! The outcome grader (l2t-spec section 3): tri-state, and an unparsable gold answer never
//! counts as correct. This version compares integers, which is all the built-in task needs.

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
    let groups: Vec<&str> = digits.split(',').collect();
    let grouped_ok = groups.len() == 1
        || (!groups[0].is_empty() && groups[0].len() <= 3 && groups[1..].iter().all(|g| g.len() == 3));
    let plain: String = groups.concat();
    if !grouped_ok || plain.is_empty() || !plain.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = plain.parse().ok()?;
    Some(if negative { -value } else { value })
}

/// Grades a predicted answer against a gold answer as integers.
pub fn grade_integer(prediction: &str, gold: &str) -> Grade {
    let Some(gold) = parse_integer(gold) else { return Grade::GoldUnparsable };
    match parse_integer(prediction) {
        None => Grade::Unparsable,
        Some(p) if p == gold => Grade::Correct,
        Some(_) => Grade::Wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_in_common_spellings() {
        for (text, want) in [("42", Some(42)), (" -7 ", Some(-7)), ("+3", Some(3)), ("1,234", Some(1234)), ("$5", Some(5)), ("12.0", Some(12))] {
            assert_eq!(parse_integer(text), want, "{text:?}");
        }
        for text in ["", "abc", "1,23", "4.5", "--1", "12a", ",123"] {
            assert_eq!(parse_integer(text), None, "{text:?}");
        }
    }

    #[test]
    fn tri_state_and_unparsable_gold() {
        assert_eq!(grade_integer("187", "187"), Grade::Correct);
        assert_eq!(grade_integer("186", "187"), Grade::Wrong);
        assert_eq!(grade_integer("x", "187"), Grade::Unparsable);
        // An unparsable gold answer never makes a prediction correct, even an identical one.
        assert_eq!(grade_integer("n/a", "n/a"), Grade::GoldUnparsable);
    }
}
