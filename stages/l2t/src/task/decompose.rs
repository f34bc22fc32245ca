//! The `decompose` testbed (`task.kind = "decompose"`): a task on which L2T's claim, accuracy
//! within reach of outcome GRPO at fewer tokens, can be confirmed or refuted on a CPU.
//!
//! A problem is a walk over a table of links between two-digit nodes (`14>37`, a single cycle
//! through `links` nodes, listed in a shuffled order) and `steps` moves: an easy move follows one
//! link (`go 1`), a hard move two (`go 2`). Each step is a lookup in the prompt, which even the tiny
//! policy learns; two lookups at once are not. The difficulty tier is the number of hard moves
//! (0..=`max_hard`), an equal share of the problems each.
//!
//! The worked solutions (the base policy's habits) hold three kinds of episode besides the steps:
//!
//! - **useful**: a "Split:" episode before a hard move that writes the node in between
//!   (`Split: 37>88>52`); the move after it is always right;
//! - **filler split**: the same kind of episode before an easy move (`Split: 14>37`), which adds
//!   nothing;
//! - **filler check**: "Check:" episodes that restate a link already followed.
//!
//! Splits appear before each move with probability `split_share`, whatever the move, and checks
//! with `redundant_share`: independently of need. A hard move written without its split is wrong
//! with probability `direct_error` (one hop short, one hop too far, or another node of the
//! table), and the rest of the solution follows the written node. An efficient policy splits
//! exactly the hard moves and never checks, so reasoning depth should follow the tier.

use super::arith::{worked_solution, CHECK_PREFIX};
use super::distinct_rows;
use crate::config::TaskConfig;
use crate::table::prompts::PromptRow;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};

pub const DATA_SOURCE: &str = "decompose";

/// Marks a decomposition episode.
pub const SPLIT_PREFIX: &str = "Split:";

/// One walk problem.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Walk {
    /// The links as the prompt lists them.
    links: Vec<(u32, u32)>,
    start: u32,
    /// Links followed by each move: 1 (easy) or 2 (hard).
    moves: Vec<u8>,
}

impl Walk {
    /// Draws a walk of tier `n_hard` over `cfg.links` nodes.
    fn draw(rng: &mut ChaCha8Rng, cfg: &TaskConfig, n_hard: usize) -> Self {
        let mut nodes: Vec<u32> = (10..=99).collect();
        nodes.shuffle(rng);
        nodes.truncate(cfg.links);
        // One cycle through every node: each node has one successor, never itself.
        let mut links: Vec<(u32, u32)> = (0..nodes.len()).map(|i| (nodes[i], nodes[(i + 1) % nodes.len()])).collect();
        links.shuffle(rng);
        let start = nodes[rng.random_range(0..nodes.len())];
        let mut moves = vec![1u8; cfg.steps];
        let mut hard_at: Vec<usize> = (0..cfg.steps).collect();
        hard_at.shuffle(rng);
        for &at in &hard_at[..n_hard] {
            moves[at] = 2;
        }
        Self { links, start, moves }
    }

    fn next(&self) -> HashMap<u32, u32> {
        self.links.iter().copied().collect()
    }

    /// The node the walk ends at.
    pub fn answer(&self) -> u32 {
        let next = self.next();
        self.moves.iter().fold(self.start, |x, &hops| (0..hops).fold(x, |x, _| next[&x]))
    }

    fn lines(&self) -> (String, String) {
        let links: Vec<String> = self.links.iter().map(|(a, b)| format!("{a}>{b}")).collect();
        let moves: String = self.moves.iter().enumerate().map(|(i, m)| format!("{}: go {m}\n", i + 1)).collect();
        (links.join(" "), moves)
    }

    /// The prompt text, which states the output format since the tiny policy sees nothing else.
    pub fn prompt(&self) -> String {
        let (links, moves) = self.lines();
        format!("Problem: start at {}.\nLinks: {links}\n{moves}Think in <episode_k> steps, then give \\boxed{{answer}}.\nSolution: ", self.start)
    }

    /// The bare question, for a chat model whose instructions come from its prompt template.
    pub fn question(&self) -> String {
        let (links, moves) = self.lines();
        format!("Links between numbers: {links}\nStart at {}, then follow these moves (go n = follow n links):\n{moves}Where do you end?", self.start)
    }

    /// Hard moves: the difficulty tier.
    pub fn n_hard(&self) -> usize {
        self.moves.iter().filter(|&&m| m == 2).count()
    }
}

/// A wrong end for a hard move from `x` written without its split: one hop short, one hop too far,
/// or another node of the table; never the right one.
fn slip(rng: &mut ChaCha8Rng, walk: &Walk, next: &HashMap<u32, u32>, x: u32) -> u32 {
    let right = next[&next[&x]];
    loop {
        let wrong = match rng.random_range(0..3) {
            0 => next[&x],
            1 => next[&right],
            _ => walk.links[rng.random_range(0..walk.links.len())].0,
        };
        if wrong != right {
            return wrong;
        }
    }
}

/// What the worked solution of one problem did, for the prompts table and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worked {
    pub text: String,
    /// The boxed answer as written (differs from the gold answer after a slip).
    pub written_answer: u32,
    /// Per move: (hard, split before it, written end right).
    pub moves: Vec<(bool, bool, bool)>,
    /// Filler episodes: splits before easy moves plus checks.
    pub filler: usize,
}

/// A worked solution in the base policy's habits (module doc).
pub fn worked(walk: &Walk, rng: &mut ChaCha8Rng, cfg: &TaskConfig) -> Worked {
    let next = walk.next();
    let n = walk.moves.len();
    let checks = if cfg.max_redundant > 0 && rng.random_bool(cfg.redundant_share) { rng.random_range(1..=cfg.max_redundant) } else { 0 };
    let mut check_after: Vec<usize> = (0..checks).map(|_| rng.random_range(1..=n)).collect();
    check_after.sort_unstable();
    let (mut episodes, mut followed, mut moves, mut filler) = (Vec::new(), Vec::new(), Vec::with_capacity(n), checks);
    let mut x = walk.start;
    for (step, &hops) in walk.moves.iter().enumerate() {
        let hard = hops == 2;
        let split = rng.random_bool(cfg.split_share);
        let right = if hard { next[&next[&x]] } else { next[&x] };
        if split {
            episodes.push(if hard { format!("{SPLIT_PREFIX} {x}>{}>{right}", next[&x]) } else { format!("{SPLIT_PREFIX} {x}>{right}") });
            filler += usize::from(!hard);
        }
        let y = if hard && !split && rng.random_bool(cfg.direct_error) { slip(rng, walk, &next, x) } else { right };
        moves.push((hard, split, y == right));
        episodes.push(format!("{}: go {hops}, {x}>{y}", step + 1));
        followed.push((x, y));
        x = y;
        for _ in check_after.iter().filter(|&&after| after == step + 1) {
            let (a, b) = followed[rng.random_range(0..followed.len())];
            episodes.push(format!("{CHECK_PREFIX} {a}>{b}"));
        }
    }
    Worked { text: worked_solution(&episodes, i64::from(x)), written_answer: x, moves, filler }
}

/// Draws the splits: `n_eval` (validation), then `n_train`, then `n_test` distinct problems, no
/// problem in two splits. Problem `i` of a split has tier `i % (max_hard + 1)`, so each tier has
/// an equal share (to within one problem).
pub fn generate(cfg: &TaskConfig, rng: &mut ChaCha8Rng) -> Result<[Vec<PromptRow>; 3]> {
    if cfg.max_hard > cfg.steps || !(3..=90).contains(&cfg.links) {
        bail!("task.kind = decompose needs task.max_hard <= task.steps and task.links in 3..=90");
    }
    let mut seen: HashSet<Walk> = HashSet::new();
    let tiers = cfg.max_hard + 1;
    let mut split = |name: &str, n: usize, rng: &mut ChaCha8Rng| {
        let draw = |rng: &mut ChaCha8Rng, i: usize| Some(Walk::draw(rng, cfg, i % tiers));
        distinct_rows(DATA_SOURCE, name, n, rng, &mut seen, draw, |rng, walk, _| {
            let w = worked(walk, rng, cfg);
            PromptRow {
                prompt_id: String::new(),
                data_source: DATA_SOURCE.into(),
                split: name.into(),
                prompt: if cfg.prompt_style == "question" { walk.question() } else { walk.prompt() },
                gold_answer: walk.answer().to_string(),
                solution: Some(w.text),
                n_steps: walk.moves.len() as u32,
                n_redundant: w.filler as u32,
                n_hard: walk.n_hard() as u32,
            }
        })
    };
    let eval = split("eval", cfg.n_eval, rng)?;
    let train = split("train", cfg.n_train, rng)?;
    let test = split("test", cfg.n_test, rng)?;
    Ok([train, eval, test])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::grade::{grade_answer, Grade};
    use crate::task::{episode_kind, EpisodeKind, BOXED_OPEN};
    use rand::SeedableRng;

    fn cfg() -> TaskConfig {
        TaskConfig {
            kind: "decompose".into(),
            steps: 3,
            links: 8,
            n_train: 600,
            n_eval: 90,
            n_test: 90,
            redundant_share: 0.9,
            max_redundant: 2,
            max_hard: 2,
            split_share: 0.5,
            direct_error: 0.7,
            ..TaskConfig::default()
        }
    }

    #[test]
    fn splits_are_deterministic_disjoint_and_tiered() {
        let [train, eval, test] = generate(&cfg(), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert_eq!((train.len(), eval.len(), test.len()), (600, 90, 90));
        let again = generate(&cfg(), &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        assert_eq!(again, [train.clone(), eval.clone(), test.clone()]);
        assert_ne!(generate(&cfg(), &mut ChaCha8Rng::seed_from_u64(4)).unwrap()[0], train);
        let prompts = |rows: &[PromptRow]| rows.iter().map(|r| r.prompt.clone()).collect::<HashSet<_>>();
        assert!(prompts(&train).is_disjoint(&prompts(&eval)) && prompts(&train).is_disjoint(&prompts(&test)));
        assert!(prompts(&eval).is_disjoint(&prompts(&test)));
        // Each tier (0, 1, 2 hard moves) is a third of every split, and the prompt shows it.
        for rows in [&train, &eval, &test] {
            for tier in 0..3u32 {
                assert_eq!(rows.iter().filter(|r| r.n_hard == tier).count(), rows.len() / 3);
            }
            for r in rows.iter() {
                assert_eq!(r.prompt.matches(": go 2").count() as u32, r.n_hard, "{}", r.prompt);
                assert!(r.prompt_id.starts_with(&format!("decompose-{}-", r.split)));
            }
        }
    }

    #[test]
    fn a_worked_example_by_hand() {
        // 14 > 37 > 88 > 52 > 14 (a cycle of 4); start 14, moves go 1, go 2, go 1 -> 37, 52, 14.
        let walk = Walk { links: vec![(88, 52), (14, 37), (52, 14), (37, 88)], start: 14, moves: vec![1, 2, 1] };
        assert_eq!(walk.answer(), 14);
        assert_eq!(walk.n_hard(), 1);
        assert_eq!(
            walk.prompt(),
            "Problem: start at 14.\nLinks: 88>52 14>37 52>14 37>88\n1: go 1\n2: go 2\n3: go 1\nThink in <episode_k> steps, then give \\boxed{answer}.\nSolution: "
        );
        // Every move split, no slips, no checks.
        let c = TaskConfig { split_share: 1.0, redundant_share: 0.0, ..cfg() };
        let w = worked(&walk, &mut ChaCha8Rng::seed_from_u64(0), &c);
        assert_eq!(
            w.text,
            "<think><episode_1>Split: 14>37</episode_1><episode_2>1: go 1, 14>37</episode_2>\
             <episode_3>Split: 37>88>52</episode_3><episode_4>2: go 2, 37>52</episode_4>\
             <episode_5>Split: 52>14</episode_5><episode_6>3: go 1, 52>14</episode_6></think>\n\\boxed{14}"
        );
        assert_eq!(w.filler, 2);
        let kinds: Vec<EpisodeKind> = w.text.split("<episode_").skip(1).map(|e| episode_kind(&format!("<episode_{e}"))).collect();
        assert_eq!(kinds, [EpisodeKind::FillerSplit, EpisodeKind::Step, EpisodeKind::UsefulSplit, EpisodeKind::Step, EpisodeKind::FillerSplit, EpisodeKind::Step]);
    }

    #[test]
    fn a_hard_move_is_right_after_its_split_and_as_often_wrong_as_designed_without_it() {
        let c = TaskConfig { n_train: 3000, ..cfg() };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut direct, mut direct_wrong, mut split_hard, mut split_any, mut moves) = (0, 0, 0, 0, 0);
        for i in 0..c.n_train {
            let walk = Walk::draw(&mut rng, &c, i % 3);
            let w = worked(&walk, &mut rng, &c);
            for &(hard, split, right) in &w.moves {
                moves += 1;
                split_any += usize::from(split);
                if hard && split {
                    split_hard += 1;
                    assert!(right, "a hard move after its split is always right");
                } else if hard {
                    direct += 1;
                    direct_wrong += usize::from(!right);
                } else {
                    assert!(right, "easy moves are always right");
                }
            }
            // The boxed answer is where the written walk ended: right when every move was (a
            // slip can still land back on the right node later, since the links form a cycle).
            let boxed = w.text.rsplit(BOXED_OPEN).next().unwrap().trim_end_matches('}');
            assert_eq!(w.written_answer.to_string(), boxed);
            if w.moves.iter().all(|m| m.2) {
                assert_eq!(grade_answer(boxed, &walk.answer().to_string()), Grade::Correct, "{}", w.text);
            }
        }
        // direct_error = 0.7 and split_share = 0.5, over ~1500 hard moves written directly.
        let wrong_rate = direct_wrong as f64 / direct as f64;
        assert!((wrong_rate - c.direct_error).abs() < 0.04, "{direct_wrong} of {direct}");
        let split_rate = split_any as f64 / moves as f64;
        assert!((split_rate - c.split_share).abs() < 0.03, "{split_any} of {moves}");
        assert!(split_hard > 500);
    }
}
