//! The `decompose` testbed (`task.kind = "decompose"`): a task on which L2T's claim, accuracy
//! within reach of outcome GRPO at fewer tokens, can be confirmed or refuted on a CPU.
//!
//! The task draws, from the run's seed, one fixed map: a cycle through `links` nodes in a random
//! order. A node is one ASCII letter (case matters), so that the tokenizer keeps it whole: one link
//! is a one-token-to-one-token fact, the first kind of fact a small model learns (two-digit nodes,
//! split one digit per token by the pre-tokenizer, were never learned: docs/testbed.md). A problem is a start node and `steps` moves along it: an easy move follows one
//! link forward or back (`go 1`, `back 1`), a hard move two (`go 2`, `back 2`). One link is a fact
//! the policy memorises in training (a table of `links` entries each way); two links at once are
//! not. The difficulty tier is the number of hard moves (0..=`max_hard`), an equal share of the
//! problems each.
//!
//! The worked solutions (the base policy's habits) hold three kinds of episode besides the moves:
//!
//! - **useful**: a "Split:" episode before a hard move that writes the node in between
//!   (`Split: k>Q>b`, or `Split: b<Q<k` going back); the move after it is always right;
//! - **filler split**: the same kind of episode before an easy move (`Split: a>k`), which adds
//!   nothing;
//! - **filler check**: "Check:" episodes that restate a link already followed.
//!
//! Splits appear before each move with probability `split_share`, whatever the move, and checks
//! with `redundant_share`: independently of need. A hard move written without its split is wrong
//! with probability `direct_error`, always the same way: one link short (the slip that forgets the
//! second link), so that the most frequent direct answer is a wrong one. The rest of the solution
//! follows the written node. An efficient policy splits exactly the hard moves and never checks,
//! so reasoning depth should follow the tier.

use super::arith::{worked_solution, CHECK_PREFIX};
use super::distinct_rows;
use crate::config::{PromptStyle, TaskConfig};
use crate::table::prompts::PromptRow;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};

pub const DATA_SOURCE: &str = "decompose";

/// Marks a decomposition episode.
pub const SPLIT_PREFIX: &str = "Split:";

/// The nodes a map draws from: one token each, and distinct symbols to the grader.
pub const NODES: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const _: () = assert!(NODES.len() == crate::config::MAX_LINKS);

/// The task's map: one cycle through the nodes, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    next: HashMap<char, char>,
    prev: HashMap<char, char>,
}

impl Map {
    /// A cycle through `links` distinct nodes in a random order.
    fn draw(rng: &mut ChaCha8Rng, links: usize) -> Self {
        let mut nodes: Vec<char> = NODES.chars().collect();
        nodes.shuffle(rng);
        nodes.truncate(links);
        let next: HashMap<char, char> = (0..nodes.len()).map(|i| (nodes[i], nodes[(i + 1) % nodes.len()])).collect();
        let prev = next.iter().map(|(&a, &b)| (b, a)).collect();
        Self { next, prev }
    }

    fn nodes(&self) -> Vec<char> {
        let mut nodes: Vec<char> = self.next.keys().copied().collect();
        nodes.sort_unstable();
        nodes
    }

    /// One link forward or back from `x`.
    fn step(&self, x: char, forward: bool) -> char {
        if forward {
            self.next[&x]
        } else {
            self.prev[&x]
        }
    }
}

/// One walk problem: a start node and moves of +-1 or +-2 links.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Walk {
    start: char,
    moves: Vec<i8>,
}

impl Walk {
    /// Draws a walk of tier `n_hard`.
    fn draw(rng: &mut ChaCha8Rng, cfg: &TaskConfig, map: &Map, n_hard: usize) -> Self {
        let nodes = map.nodes();
        let start = nodes[rng.random_range(0..nodes.len())];
        let mut hard_at: Vec<usize> = (0..cfg.steps).collect();
        hard_at.shuffle(rng);
        let moves = (0..cfg.steps)
            .map(|i| {
                let hops = if hard_at[..n_hard].contains(&i) { 2 } else { 1 };
                if rng.random_bool(0.5) {
                    hops
                } else {
                    -hops
                }
            })
            .collect();
        Self { start, moves }
    }

    /// The nodes a move of `hops` links from `x` passes through, its end last.
    fn path(map: &Map, x: char, hops: i8) -> Vec<char> {
        let mut at = x;
        (0..hops.unsigned_abs())
            .map(|_| {
                at = map.step(at, hops > 0);
                at
            })
            .collect()
    }

    /// The node the walk ends at.
    pub fn answer(&self, map: &Map) -> char {
        self.moves.iter().fold(self.start, |x, &hops| *Self::path(map, x, hops).last().expect("a move follows a link"))
    }

    fn move_name(hops: i8) -> String {
        format!("{} {}", if hops > 0 { "go" } else { "back" }, hops.unsigned_abs())
    }

    fn lines(&self) -> String {
        self.moves.iter().enumerate().map(|(i, &m)| format!("{}: {}\n", i + 1, Self::move_name(m))).collect()
    }

    /// The prompt text, which states the output format since the tiny policy sees nothing else.
    pub fn prompt(&self) -> String {
        format!("Problem: start at {}.\n{}Think in <episode_k> steps, then give \\boxed{{answer}}.\nSolution: ", self.start, self.lines())
    }

    /// The bare question, for a chat model whose instructions come from its prompt template.
    pub fn question(&self) -> String {
        format!(
            "Start at {} on the map, then make these moves (go n: n links forward; back n: n links back):\n{}Where do you end?",
            self.start,
            self.lines()
        )
    }

    /// Hard moves: the difficulty tier.
    pub fn n_hard(&self) -> usize {
        self.moves.iter().filter(|m| m.unsigned_abs() == 2).count()
    }
}

/// The link written between two nodes: `>` forward, `<` back. The direction sits in the token
/// right before the node it leads to, so that the lookup is one step from two adjacent tokens (with
/// one arrow for both directions, the tiny policy went the wrong way on a quarter of its easy moves:
/// docs/testbed.md, design 6).
fn arrow(hops: i8) -> &'static str {
    if hops > 0 {
        ">"
    } else {
        "<"
    }
}

/// What the worked solution of one problem did, for the prompts table and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worked {
    pub text: String,
    /// The boxed answer as written (differs from the gold answer after a slip).
    pub written_answer: char,
    /// Per move: (hard, split before it, written end right).
    pub moves: Vec<(bool, bool, bool)>,
    /// Filler episodes: splits before easy moves plus checks.
    pub filler: usize,
}

/// A worked solution in the base policy's habits (module doc).
pub fn worked(walk: &Walk, map: &Map, rng: &mut ChaCha8Rng, cfg: &TaskConfig) -> Worked {
    let n = walk.moves.len();
    let checks = if cfg.max_redundant > 0 && rng.random_bool(cfg.redundant_share) { rng.random_range(1..=cfg.max_redundant) } else { 0 };
    let mut check_after: Vec<usize> = (0..checks).map(|_| rng.random_range(1..=n)).collect();
    check_after.sort_unstable();
    let (mut episodes, mut followed, mut moves, mut filler) = (Vec::new(), Vec::new(), Vec::with_capacity(n), checks);
    let mut x = walk.start;
    for (step, &hops) in walk.moves.iter().enumerate() {
        let hard = hops.unsigned_abs() == 2;
        let split = rng.random_bool(cfg.split_share);
        let path = Walk::path(map, x, hops);
        let right = *path.last().expect("a move follows a link");
        if split {
            let nodes: Vec<String> = std::iter::once(x).chain(path.iter().copied()).map(|v| v.to_string()).collect();
            episodes.push(format!("{SPLIT_PREFIX} {}", nodes.join(arrow(hops))));
            filler += usize::from(!hard);
        }
        // The slip forgets the second link.
        let y = if hard && !split && rng.random_bool(cfg.direct_error) { path[0] } else { right };
        moves.push((hard, split, y == right));
        episodes.push(format!("{}: {}, {x}{}{y}", step + 1, Walk::move_name(hops), arrow(hops)));
        followed.push((x, arrow(hops), y));
        x = y;
        for _ in check_after.iter().filter(|&&after| after == step + 1) {
            let (a, to, b) = followed[rng.random_range(0..followed.len())];
            episodes.push(format!("{CHECK_PREFIX} {a}{to}{b}"));
        }
    }
    Worked { text: worked_solution(&episodes, x), written_answer: x, moves, filler }
}

/// Draws the splits: `n_eval` (validation), then `n_train`, then `n_test` distinct problems, no
/// problem in two splits. Problem `i` of a split has tier `i % (max_hard + 1)`, so each tier has
/// an equal share (to within one problem).
pub fn generate(cfg: &TaskConfig, rng: &mut ChaCha8Rng) -> Result<[Vec<PromptRow>; 3]> {
    if cfg.max_hard > cfg.steps || !(3..=NODES.len()).contains(&cfg.links) {
        bail!("task.kind = decompose needs task.max_hard <= task.steps and task.links in 3..={}", NODES.len());
    }
    let map = Map::draw(rng, cfg.links);
    let mut seen: HashSet<Walk> = HashSet::new();
    let tiers = cfg.max_hard + 1;
    let mut split = |name: &str, n: usize, rng: &mut ChaCha8Rng| {
        let draw = |rng: &mut ChaCha8Rng, i: usize| Some(Walk::draw(rng, cfg, &map, i % tiers));
        distinct_rows(DATA_SOURCE, name, n, rng, &mut seen, draw, |rng, walk, _| {
            let w = worked(walk, &map, rng, cfg);
            PromptRow {
                prompt_id: String::new(),
                data_source: DATA_SOURCE.into(),
                split: name.into(),
                prompt: if cfg.prompt_style == PromptStyle::Question { walk.question() } else { walk.prompt() },
                gold_answer: walk.answer(&map).to_string(),
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
            kind: crate::config::TaskKind::Decompose,
            steps: 4,
            links: 52,
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
                assert_eq!(r.prompt.matches(" 2\n").count() as u32, r.n_hard, "{}", r.prompt);
                assert!(r.prompt_id.starts_with(&format!("decompose-{}-", r.split)));
            }
        }
    }

    #[test]
    fn a_worked_example_by_hand() {
        // The cycle a > k > Q > b > a; start a, moves go 1, go 2, back 1 -> k, b, Q.
        let next = HashMap::from([('a', 'k'), ('k', 'Q'), ('Q', 'b'), ('b', 'a')]);
        let map = Map { prev: next.iter().map(|(&a, &b)| (b, a)).collect(), next };
        let walk = Walk { start: 'a', moves: vec![1, 2, -1] };
        assert_eq!(walk.answer(&map), 'Q');
        assert_eq!(walk.n_hard(), 1);
        assert_eq!(
            walk.prompt(),
            "Problem: start at a.\n1: go 1\n2: go 2\n3: back 1\nThink in <episode_k> steps, then give \\boxed{answer}.\nSolution: "
        );
        // Every move split, no slips, no checks.
        let c = TaskConfig { split_share: 1.0, redundant_share: 0.0, ..cfg() };
        let w = worked(&walk, &map, &mut ChaCha8Rng::seed_from_u64(0), &c);
        assert_eq!(
            w.text,
            "<think><episode_1>Split: a>k</episode_1><episode_2>1: go 1, a>k</episode_2>\
             <episode_3>Split: k>Q>b</episode_3><episode_4>2: go 2, k>b</episode_4>\
             <episode_5>Split: b<Q</episode_5><episode_6>3: back 1, b<Q</episode_6></think>\n\\boxed{Q}"
        );
        assert_eq!(w.filler, 2);
        let kinds: Vec<EpisodeKind> = w.text.split("<episode_").skip(1).map(|e| episode_kind(&format!("<episode_{e}"))).collect();
        assert_eq!(
            kinds,
            [
                EpisodeKind::FillerSplit,
                EpisodeKind::Step,
                EpisodeKind::UsefulSplit,
                EpisodeKind::Step,
                EpisodeKind::FillerSplit,
                EpisodeKind::Step
            ]
        );
        // Without its split, a slipped hard move stops one link short: k>Q, then back 1 to k.
        let c = TaskConfig { split_share: 0.0, direct_error: 1.0, ..c };
        let w = worked(&walk, &map, &mut ChaCha8Rng::seed_from_u64(0), &c);
        assert!(w.text.contains("<episode_2>2: go 2, k>Q</episode_2><episode_3>3: back 1, Q<k</episode_3>"), "{}", w.text);
        assert_eq!((w.written_answer, w.moves[1]), ('k', (true, false, false)));
    }

    #[test]
    fn nodes_are_distinct_answers_to_the_grader() {
        for a in NODES.chars() {
            for b in NODES.chars() {
                let want = if a == b { Grade::Correct } else { Grade::Wrong };
                assert_eq!(grade_answer(&a.to_string(), &b.to_string()), want, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_hard_move_is_right_after_its_split_and_as_often_wrong_as_designed_without_it() {
        let c = TaskConfig { n_train: 3000, ..cfg() };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let map = Map::draw(&mut rng, c.links);
        let (mut direct, mut direct_wrong, mut split_hard, mut split_any, mut moves) = (0, 0, 0, 0, 0);
        for i in 0..c.n_train {
            let walk = Walk::draw(&mut rng, &c, &map, i % 3);
            let w = worked(&walk, &map, &mut rng, &c);
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
            // The boxed answer is where the written walk ended: right when every move was.
            let boxed = w.text.rsplit(BOXED_OPEN).next().unwrap().trim_end_matches('}');
            assert_eq!(w.written_answer.to_string(), boxed);
            if w.moves.iter().all(|m| m.2) {
                assert_eq!(grade_answer(boxed, &walk.answer(&map).to_string()), Grade::Correct, "{}", w.text);
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
