//! The built-in synthetic task: seeded, verifiable multi-step arithmetic with worked solutions in
//! the episode format (design.md, "Data").
//!
//! A problem is a start value and `steps` operations; each operation is one episode of the worked
//! solution. A share of solutions also carries redundant "Check:" episodes that restate or invert an
//! earlier step: the "one more thought" habit the L2T reward is meant to remove.

use super::{distinct_rows, episode_close, episode_open, BOXED_OPEN, THINK_CLOSE, THINK_OPEN};
use crate::config::{PromptStyle, TaskConfig};
use crate::table::prompts::PromptRow;
use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;

pub const DATA_SOURCE: &str = "tiny-arith";

/// Marks a redundant episode in worked solutions (and lets evaluation count them in samples).
pub const CHECK_PREFIX: &str = "Check:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Add(i64),
    Sub(i64),
    Mul(i64),
}

impl Op {
    fn apply(self, x: i64) -> i64 {
        match self {
            Op::Add(b) => x + b,
            Op::Sub(b) => x - b,
            Op::Mul(m) => x * m,
        }
    }

    fn symbol(self) -> (char, i64) {
        match self {
            Op::Add(b) => ('+', b),
            Op::Sub(b) => ('-', b),
            Op::Mul(m) => ('*', m),
        }
    }
}

/// One arithmetic problem.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    start: i64,
    ops: Vec<Op>,
}

impl Problem {
    /// Draws a problem whose intermediate values all lie in [0, max_value].
    fn draw(rng: &mut ChaCha8Rng, cfg: &TaskConfig) -> Self {
        let max_operand = i64::from(cfg.max_operand);
        let start = rng.random_range(1..=max_operand);
        let mut x = start;
        let mut ops = Vec::with_capacity(cfg.steps);
        while ops.len() < cfg.steps {
            let op = match rng.random_range(0..3) {
                0 => Op::Add(rng.random_range(1..=max_operand)),
                1 => Op::Sub(rng.random_range(1..=max_operand)),
                _ => Op::Mul(rng.random_range(2..=i64::from(cfg.max_multiplier))),
            };
            let y = op.apply(x);
            if (0..=i64::from(cfg.max_value)).contains(&y) {
                ops.push(op);
                x = y;
            }
        }
        Self { start, ops }
    }

    pub fn answer(&self) -> i64 {
        self.ops.iter().fold(self.start, |x, op| op.apply(x))
    }

    /// The prompt text: one numbered line per operation, so that episode k can find its
    /// operation by its number. It states the output format, since the model sees nothing else.
    pub fn prompt(&self) -> String {
        format!(
            "Problem: start with {}.\n{}Think in <episode_k> steps, then give \\boxed{{answer}}.\nSolution: ",
            self.start,
            self.step_lines()
        )
    }

    /// The bare question, for a chat model whose instructions come from its prompt template.
    pub fn question(&self) -> String {
        format!("Start with {}, then apply these operations in order:\n{}What number do you end with?", self.start, self.step_lines())
    }

    fn step_lines(&self) -> String {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let (sym, operand) = op.symbol();
                format!("{}: {sym} {operand}\n", i + 1)
            })
            .collect()
    }

    /// A worked solution with `checks` redundant episodes, placed by `rng`.
    pub fn solution(&self, rng: &mut ChaCha8Rng, checks: usize) -> String {
        // (value before, op, value after) for every step.
        let mut trace = Vec::with_capacity(self.ops.len());
        let mut x = self.start;
        for &op in &self.ops {
            let y = op.apply(x);
            trace.push((x, op, y));
            x = y;
        }
        // A check goes after step `after` (1-based) and re-verifies a step at or before it.
        let mut check_after: Vec<usize> = (0..checks).map(|_| rng.random_range(1..=self.ops.len())).collect();
        check_after.sort_unstable();
        let mut episodes: Vec<String> = Vec::new();
        let mut next_check = 0;
        for (step, &(a, _, b)) in trace.iter().enumerate() {
            episodes.push(self.step_episode(step, a, b));
            while next_check < check_after.len() && check_after[next_check] == step + 1 {
                let checked = trace[rng.random_range(0..=step)];
                episodes.push(check_episode(rng, checked));
                next_check += 1;
            }
        }
        worked_solution(&episodes, self.answer())
    }

    /// The episode that applies step `step` (0-based) to `before`, giving `after` as written.
    fn step_episode(&self, step: usize, before: i64, after: i64) -> String {
        let (sym, operand) = self.ops[step].symbol();
        // Restate the prompt's line for this step, then apply it.
        format!("{}: {sym} {operand}, {before} {sym} {operand} = {after}", step + 1)
    }
}

/// Episodes in tags inside the reasoning block, then the boxed answer.
pub(crate) fn worked_solution(episodes: &[String], answer: impl std::fmt::Display) -> String {
    let body: String =
        episodes.iter().enumerate().map(|(i, text)| format!("{}{text}{}", episode_open(i + 1), episode_close(i + 1))).collect();
    format!("{THINK_OPEN}{body}{THINK_CLOSE}\n{BOXED_OPEN}{answer}}}")
}

/// A redundant episode that restates or inverts the step `(before, op, after)`, as written.
fn check_episode(rng: &mut ChaCha8Rng, (before, op, after): (i64, Op, i64)) -> String {
    let (sym, operand) = op.symbol();
    let check = match (rng.random_bool(0.5), op) {
        // Invert the step: undo it from the result.
        (true, Op::Add(_)) => format!("{after} - {operand} = {before}"),
        (true, Op::Sub(_)) => format!("{after} + {operand} = {before}"),
        (true, Op::Mul(_)) => format!("{after} / {operand} = {before}"),
        // Restate the step.
        (false, _) => format!("{before} {sym} {operand} = {after}"),
    };
    format!("{CHECK_PREFIX} {check}")
}

/// Generates the splits: `n_eval` then `n_train` then `n_test` distinct problems, no problem in two
/// splits, every row with a worked solution.
pub fn generate(cfg: &TaskConfig, rng: &mut ChaCha8Rng) -> Result<(Vec<PromptRow>, Vec<PromptRow>, Vec<PromptRow>)> {
    let mut seen: HashSet<Problem> = HashSet::new();
    let mut split = |name: &str, n: usize, rng: &mut ChaCha8Rng| {
        let draw = |rng: &mut ChaCha8Rng, _| Some(Problem::draw(rng, cfg));
        distinct_rows("arith", name, n, rng, &mut seen, draw, |rng, problem, _| {
            let checks =
                if rng.random_bool(cfg.redundant_share) && cfg.max_redundant > 0 { rng.random_range(1..=cfg.max_redundant) } else { 0 };
            PromptRow {
                prompt_id: String::new(),
                data_source: DATA_SOURCE.into(),
                split: name.into(),
                prompt: if cfg.prompt_style == PromptStyle::Question { problem.question() } else { problem.prompt() },
                gold_answer: problem.answer().to_string(),
                solution: Some(problem.solution(rng, checks)),
                n_steps: problem.ops.len() as u32,
                n_redundant: checks as u32,
                n_hard: 0,
            }
        })
    };
    let eval = split("eval", cfg.n_eval, rng)?;
    let train = split("train", cfg.n_train, rng)?;
    let test = split("test", cfg.n_test, rng)?;
    Ok((train, eval, test))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::grade::{grade_answer, Grade};
    use rand::SeedableRng;

    fn cfg() -> TaskConfig {
        TaskConfig { n_train: 300, n_eval: 50, ..TaskConfig::default() }
    }

    /// (train, eval) of the task at `seed`.
    fn generate(cfg: &TaskConfig, seed: u64) -> Result<(Vec<PromptRow>, Vec<PromptRow>)> {
        let splits = crate::task::generate(cfg, seed)?;
        Ok((splits.train, splits.eval))
    }

    #[test]
    fn splits_are_disjoint_deterministic_and_verifiable() {
        let (train, eval) = generate(&cfg(), 7).unwrap();
        assert_eq!((train.len(), eval.len()), (300, 50));
        let eval_prompts: HashSet<_> = eval.iter().map(|r| r.prompt.clone()).collect();
        assert!(train.iter().all(|r| !eval_prompts.contains(&r.prompt)));
        assert_eq!(generate(&cfg(), 7).unwrap(), (train.clone(), eval));
        assert_ne!(generate(&cfg(), 8).unwrap().0, train);
        for row in &train {
            // The worked solution's boxed answer is the gold answer.
            let solution = row.solution.as_ref().unwrap();
            let boxed = solution.rsplit(BOXED_OPEN).next().unwrap().trim_end_matches('}');
            assert_eq!(grade_answer(boxed, &row.gold_answer), Grade::Correct);
            let episodes = solution.matches("</episode_").count() as u32;
            assert_eq!(episodes, row.n_steps + row.n_redundant);
            assert_eq!(solution.matches(CHECK_PREFIX).count() as u32, row.n_redundant);
        }
    }

    #[test]
    fn redundant_share_controls_checks() {
        let none = TaskConfig { redundant_share: 0.0, ..cfg() };
        assert!(generate(&none, 1).unwrap().0.iter().all(|r| r.n_redundant == 0));
        let all = TaskConfig { redundant_share: 1.0, max_redundant: 2, ..cfg() };
        assert!(generate(&all, 1).unwrap().0.iter().all(|r| (1..=2).contains(&r.n_redundant)));
    }

    #[test]
    fn worked_example() {
        let p = Problem { start: 23, ops: vec![Op::Add(45), Op::Mul(3), Op::Sub(17)] };
        assert_eq!(p.answer(), 187);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            p.solution(&mut rng, 0),
            "<think><episode_1>1: + 45, 23 + 45 = 68</episode_1><episode_2>2: * 3, 68 * 3 = 204</episode_2>\
             <episode_3>3: - 17, 204 - 17 = 187</episode_3></think>\n\\boxed{187}"
        );
        assert!(p.prompt().starts_with("Problem: start with 23.\n1: + 45\n2: * 3\n3: - 17\nThink"));
    }
}
