//! `fisher-reward`: `J`, `dI` and the compression penalty `C` of every episode.

use super::shard::{execute_sharded, Sharded};
use super::{check_sampled_by, episodes_by_rollout, iteration_policy, policy_input, progress_bar, Ctx, Summary};
use crate::config::Estimator;
use crate::model::qwen2::MlpWeights;
use crate::model::tokenizer;
use crate::model::{build_model, build_top_as, read_artifact_tensors, Policy};
use crate::reward::info_gain::{continuation_room, delta_i, j_values, JRequest, CONTINUATION_CACHE_BYTES};
use crate::reward::penalty::{self, c_fisher, direction, directional_derivatives, ProxyModel};
use crate::reward::prefill::{Prefill, SharedPrompts};
use crate::reward::segment::{reasoning_tokens, token_char_ends};
use crate::stage::Stage;
use crate::store::{Artifact, Staging};
use crate::table::episode_rewards::{self, EpisodeRewardRow};
use crate::table::episodes::{self, EpisodeRow};
use crate::table::prompts::{self, PromptRow};
use crate::table::rollouts::{self, RolloutRow};
use crate::task::episode_kind;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// The proxy block's layer index (`penalty.block`, negative counts from the end).
fn proxy_layer(block: i64, layers: usize) -> Result<usize> {
    let layer = if block < 0 { layers as i64 + block } else { block };
    if layer < 0 || layer >= layers as i64 {
        bail!("penalty.block = {block} but the policy has {layers} decoder layers");
    }
    Ok(layer as usize)
}

/// `fisher-reward`: for every episode, `J` before and after it, `dI`, `g . D~` and raw and scaled
/// `C` (l2t-spec 4-5), under the policy that sampled the iteration. `J` and `g . D~` are per
/// rollout and shard by prompt group; the batch's scaling of `C` is computed once, in
/// [`Sharded::finish`].
pub fn run_fisher_reward(ctx: &Ctx, iteration: u32) -> Result<Summary> {
    let cfg = &ctx.config;
    let sample = ctx.store.open_ref(&ctx.run, &Stage::Sample.at(iteration))?;
    let seg = ctx.store.open_ref(&ctx.run, &Stage::Segment.at(iteration))?;
    let policy = iteration_policy(ctx, iteration)?;
    let base = ctx.store.open_ref(&ctx.run, Stage::Bootstrap.name())?;
    let inputs = vec![
        sample.manifest.as_input("rollouts", &[prompts::ITERATION_FILE, rollouts::FILE])?,
        seg.manifest.as_input("episodes", &[episodes::FILE])?,
        policy_input("policy", &policy, false)?,
        policy_input("base", &base, false)?,
    ];
    let job = FisherJob { ctx, iteration, sample, seg, policy, base };
    let slot = Stage::FisherReward.at(iteration);
    execute_sharded(ctx, Stage::FisherReward, &slot, Stage::FisherReward.params(cfg), inputs, vec![], &job)
}

struct FisherJob<'a> {
    ctx: &'a Ctx,
    iteration: u32,
    sample: Artifact,
    seg: Artifact,
    policy: Artifact,
    base: Artifact,
}

/// The iteration's rollouts and their episodes, in order.
struct Batch {
    prompts: Vec<PromptRow>,
    rollouts: Vec<RolloutRow>,
    episodes: Vec<EpisodeRow>,
}

impl Batch {
    fn by_rollout(&self) -> Result<Vec<&[EpisodeRow]>> {
        episodes_by_rollout(&self.rollouts, &self.episodes)
    }
}

/// `J` and `g . D~` of the rollouts of a range of prompt groups.
struct Terms {
    /// `J(i, 0..=K_i)` per rollout.
    j: Vec<Vec<f64>>,
    /// `g . D~` per episode, per rollout.
    g_dot_d: Vec<Vec<f64>>,
    /// `||D~||^2`, the ranks kept and the proxy layer (the same in every shard).
    d_norm_sq: f64,
    ranks: [usize; 3],
    layer: usize,
    j_seconds: f64,
    c_seconds: f64,
}

/// The file a `fisher-reward` shard keeps its [`Terms`] in: little-endian f64s and u64s, exact.
const TERMS_FILE: &str = "terms.bin";

impl Terms {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut f = |v: f64| out.extend_from_slice(&v.to_le_bytes());
        f(self.d_norm_sq);
        f(self.j_seconds);
        f(self.c_seconds);
        let mut words = vec![self.layer as u64, self.ranks[0] as u64, self.ranks[1] as u64, self.ranks[2] as u64, self.j.len() as u64];
        let mut values: Vec<f64> = Vec::new();
        for (j, g) in self.j.iter().zip(&self.g_dot_d) {
            words.extend([j.len() as u64, g.len() as u64]);
            values.extend(j.iter().chain(g));
        }
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut words = bytes.chunks_exact(8).map(|c| <[u8; 8]>::try_from(c).expect("chunks of 8"));
        let mut next = || words.next().context("truncated");
        let (d_norm_sq, j_seconds, c_seconds) = (f64::from_le_bytes(next()?), f64::from_le_bytes(next()?), f64::from_le_bytes(next()?));
        let mut int = || -> Result<usize> { usize::try_from(u64::from_le_bytes(next()?)).context("a length out of range") };
        let (layer, ranks, n) = (int()?, [int()?, int()?, int()?], int()?);
        let lens: Vec<(usize, usize)> = (0..n.min(bytes.len())).map(|_| Ok((int()?, int()?))).collect::<Result<_>>()?;
        let (mut j, mut g_dot_d) = (Vec::new(), Vec::new());
        for (nj, ng) in lens {
            let mut take =
                |len: usize| -> Result<Vec<f64>> { (0..len.min(bytes.len())).map(|_| Ok(f64::from_le_bytes(next()?))).collect() };
            j.push(take(nj)?);
            g_dot_d.push(take(ng)?);
        }
        if next().is_ok() || !bytes.len().is_multiple_of(8) {
            bail!("trailing bytes");
        }
        Ok(Self { j, g_dot_d, d_norm_sq, ranks, layer, j_seconds, c_seconds })
    }
}

impl FisherJob<'_> {
    fn batch(&self) -> Result<Batch> {
        Ok(Batch {
            prompts: prompts::read(&self.sample.file(prompts::ITERATION_FILE)?)?,
            rollouts: rollouts::read(&self.sample.file(rollouts::FILE)?)?,
            episodes: episodes::read(&self.seg.file(episodes::FILE)?)?,
        })
    }
}

impl Sharded for FisherJob<'_> {
    type Piece = Terms;

    fn groups(&self) -> Result<usize> {
        Ok(prompts::read(&self.sample.file(prompts::ITERATION_FILE)?)?.len())
    }

    fn compute(&self, groups: Range<usize>) -> Result<Terms> {
        let cfg = &self.ctx.config;
        let batch = self.batch()?;
        let all_by_rollout = batch.by_rollout()?;
        let policy = Policy::load_as(&self.policy, &self.ctx.device, self.ctx.dtype)?;
        check_sampled_by(&policy, &batch.rollouts, self.iteration)?;
        let pad = policy.pad_id;
        let gold: HashMap<&str, &str> = batch.prompts.iter().map(|p| (p.prompt_id.as_str(), p.gold_answer.as_str())).collect();
        // This shard's rollouts: those of its prompt groups.
        let mine: std::collections::HashSet<&str> = batch.prompts[groups].iter().map(|p| p.prompt_id.as_str()).collect();
        let (rollout_rows, by_rollout): (Vec<&RolloutRow>, Vec<&[EpisodeRow]>) =
            batch.rollouts.iter().zip(all_by_rollout).filter(|(r, _)| mine.contains(r.prompt_id.as_str())).unzip();
        let close = tokenizer::encode(&policy.tokenizer, &cfg.reward.close).context("reward.close")?;
        let mut answers: HashMap<&str, Vec<u32>> = HashMap::new();
        for r in &rollout_rows {
            let g = gold
                .get(r.prompt_id.as_str())
                .with_context(|| format!("{}: prompt {} is not in {}", rollouts::FILE, r.prompt_id, prompts::ITERATION_FILE))?;
            if !answers.contains_key(r.prompt_id.as_str()) {
                answers.insert(r.prompt_id.as_str(), tokenizer::encode(&policy.tokenizer, &format!("{g}}}"))?);
            }
        }
        // J(i, 0..=K): the prefix of episode k ends at its last token, or where the response closes
        // its own reasoning if that comes first (so `close` follows reasoning, never an answer),
        // and never includes a final end-of-sequence token.
        let reasoning_ends: Vec<usize> = rollout_rows
            .iter()
            .map(|r| {
                let ends = token_char_ends(&tokenizer::decode_pieces(&policy.tokenizer, &r.token_ids)?);
                let without_eos = r.token_ids.len() - usize::from(r.token_ids.last().is_some_and(|&t| policy.is_stop(t)));
                Ok(reasoning_tokens(&r.text, &ends, without_eos))
            })
            .collect::<Result<_>>()?;
        // The penalty's direction D~ on the proxy block, before the passes that read it.
        let layer = proxy_layer(cfg.penalty.block, policy.cfg.num_hidden_layers)?;
        // Only the base's proxy block is read: its three matrices, no model built over them.
        let (base_cfg, mut base_block) = read_artifact_tensors(&self.base, &self.ctx.device, &MlpWeights::names(layer))?;
        if base_cfg != policy.cfg {
            bail!("the base policy's config.json differs from the policy's: D = theta_now - theta_ref needs one architecture");
        }
        // The penalty's trunk runs in f32 whatever `dtype` is: a step of eps D~ must stay above
        // the rounding of what it is compared across.
        let f32_trunk;
        let trunk = if policy.model.dtype() == DType::F32 {
            &policy.model
        } else {
            f32_trunk = build_model(&policy.cfg, &policy.weights, &self.ctx.device)?;
            &f32_trunk
        };
        let [gate, up, down] =
            MlpWeights::names(layer).map(|name| base_block.remove(&name).context("read_artifact_tensors gives every name"));
        let (now_block, base_block) = (trunk.mlp_weights(layer), MlpWeights::from_matrices([gate?, up?, down?]));
        // D = 0 (the first iteration) makes D~ = 0 and C = 0: then no pass needs the proxy block.
        let moved = !now_block.equals(&base_block)?;
        let tail = match cfg.penalty.estimator {
            Estimator::Fd | Estimator::Grad if moved => {
                Some(build_top_as(&policy.cfg, &policy.weights, layer, DType::F64, &self.ctx.device)?)
            }
            _ => None,
        };
        let proxy = ProxyModel { trunk, tail: tail.as_ref(), layer };
        // When J's pass runs in f32 it also keeps the residual the penalty starts from, so the
        // model below the proxy block runs once for both terms.
        let capture = (moved && std::ptr::eq(trunk, &policy.model)).then_some(layer);
        std::thread::scope(|scope| {
            // D~'s eigenproblems run on their own thread beside J's pass, in the core time its
            // parallel regions leave idle; the penalty waits for them.
            let pending = scope.spawn(|| direction(&now_block, &base_block, cfg.penalty.rank_fraction));
            let mut pending = Some(pending);
            let mut dir: Option<penalty::Direction> = None;
            let mut direction_now = || -> Result<penalty::Direction> {
                if let Some(handle) = pending.take() {
                    dir = Some(handle.join().map_err(|_| anyhow::anyhow!("the thread computing D~ panicked"))??);
                }
                dir.clone().context("D~ was computed")
            };
            let bar = progress_bar(rollout_rows.len() as u64, "fisher-reward");
            let (mut j, mut g_dot_d) = (Vec::with_capacity(rollout_rows.len()), Vec::with_capacity(rollout_rows.len()));
            let (mut j_seconds, mut c_seconds) = (0.0, 0.0);
            let chunk = cfg.reward.batch_rows;
            for ((rows, eps), reasoning_ends) in rollout_rows.chunks(chunk).zip(by_rollout.chunks(chunk)).zip(reasoning_ends.chunks(chunk))
            {
                let started = Instant::now();
                let seqs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (&r.prompt_token_ids[..], &r.token_ids[..])).collect();
                let layout = SharedPrompts::new(&seqs)?;
                let requests: Vec<JRequest> = rows
                    .iter()
                    .zip(eps)
                    .zip(reasoning_ends)
                    .map(|((r, eps), &reasoning_end)| {
                        let answer = &answers[r.prompt_id.as_str()];
                        JRequest {
                            ends: eps.iter().map(|e| (e.token_end as usize).min(reasoning_end)).collect(),
                            continuation: close.iter().chain(answer).copied().collect(),
                            answer_len: answer.len(),
                        }
                    })
                    .collect();
                let prefill = layout.prefill(&policy.model, pad, capture, continuation_room(&requests))?;
                j.extend(j_values(&policy.model, &layout, &prefill, pad, &requests, cfg.reward.j_mode, CONTINUATION_CACHE_BYTES)?);
                let Prefill { cache, mid, .. } = prefill;
                drop(cache);
                j_seconds += started.elapsed().as_secs_f64();

                // g . D~ per episode.
                let started = Instant::now();
                if !moved {
                    g_dot_d.extend(eps.iter().map(|eps| vec![0.0; eps.len()]));
                } else {
                    let dev = &self.ctx.device;
                    let mid = match mid {
                        Some(mid) => mid,
                        None => trunk.forward_to_mlp(&layout.tokens(pad, dev)?, &layout.positions(dev)?, &layout.mask(dev)?, layer)?,
                    };
                    let spans: Vec<Vec<(usize, usize)>> =
                        eps.iter().map(|eps| eps.iter().map(|e| (e.token_start as usize, e.token_end as usize)).collect()).collect();
                    g_dot_d.extend(directional_derivatives(
                        &proxy,
                        &direction_now()?,
                        &layout,
                        &mid,
                        &spans,
                        cfg.penalty.estimator,
                        cfg.penalty.eps,
                    )?);
                }
                c_seconds += started.elapsed().as_secs_f64();
                bar.inc(rows.len() as u64);
            }
            bar.finish_and_clear();
            let dir = direction_now()?;
            Ok(Terms { j, g_dot_d, d_norm_sq: dir.norm_sq, ranks: dir.ranks, layer, j_seconds, c_seconds })
        })
    }
    fn write_piece(&self, terms: &Terms, staging: &mut Staging) -> Result<serde_json::Value> {
        staging.write_file(TERMS_FILE, &terms.to_bytes())?;
        Ok(serde_json::json!({ "rollouts": terms.j.len() }))
    }

    fn read_piece(&self, shard: &Artifact) -> Result<Terms> {
        let path = shard.file(TERMS_FILE)?;
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Terms::from_bytes(&bytes).with_context(|| format!("{}: not a fisher-reward shard", path.display()))
    }

    fn finish(&self, pieces: Vec<Terms>, staging: &mut Staging) -> Result<serde_json::Value> {
        let cfg = &self.ctx.config;
        let batch = self.batch()?;
        let by_rollout = batch.by_rollout()?;
        let rollout_rows = &batch.rollouts;
        let first = pieces.first().context("no shards")?;
        let (d_norm_sq, ranks, layer) = (first.d_norm_sq, first.ranks, first.layer);
        let (j_seconds, c_seconds) = (pieces.iter().map(|p| p.j_seconds).sum::<f64>(), pieces.iter().map(|p| p.c_seconds).sum::<f64>());
        let (mut j, mut g_dot_d) = (Vec::new(), Vec::new());
        for piece in pieces {
            if piece.d_norm_sq.to_bits() != d_norm_sq.to_bits() || piece.layer != layer {
                bail!("the shards disagree on the update direction D~ (were they computed from other policies?)");
            }
            j.extend(piece.j);
            g_dot_d.extend(piece.g_dot_d);
        }
        let shapes_match = j.len() == rollout_rows.len()
            && by_rollout.iter().zip(&j).zip(&g_dot_d).all(|((eps, j), g)| j.len() == eps.len() + 1 && g.len() == eps.len());
        if !shapes_match {
            bail!("the shards' terms do not cover the iteration's {} rollouts and their episodes", rollout_rows.len());
        }
        let c_raw: Vec<f64> = g_dot_d.iter().flatten().map(|&gd| c_fisher(gd, d_norm_sq, cfg.penalty.damping)).collect();
        let d_i: Vec<Vec<f64>> = j.iter().map(|j| delta_i(j)).collect();
        // E: the episodes of rollouts that take part in training.
        let in_e: Vec<bool> = by_rollout.iter().flat_map(|eps| eps.iter().map(|e| !e.excluded)).collect();
        let (c_scaled, gain) = penalty::scale_penalties(&c_raw, &d_i.concat(), &in_e, cfg.penalty.scale, cfg.penalty.cap_quantile);
        let scale_metrics = gain.map(|g| serde_json::json!({ "q": g.q, "mean_abs_d_i": g.mean_abs_d_i, "mean_c_capped": g.mean_c_capped }));

        let mut rows = Vec::with_capacity(c_raw.len());
        for (i, r) in rollout_rows.iter().enumerate() {
            let d = &d_i[i];
            for (k, e) in by_rollout[i].iter().enumerate() {
                let at = rows.len();
                rows.push(EpisodeRewardRow {
                    iteration: self.iteration,
                    prompt_id: r.prompt_id.clone(),
                    sample_idx: r.sample_idx,
                    episode_idx: e.episode_idx,
                    j_before: j[i][k],
                    j_after: j[i][k + 1],
                    d_i: d[k],
                    g_dot_d: g_dot_d[i][k],
                    c_raw: c_raw[at],
                    c_scaled: c_scaled[at],
                    estimator: cfg.penalty.estimator.to_string(),
                });
            }
        }
        if let Some(bad) = rows.iter().position(|r| ![r.j_before, r.j_after, r.g_dot_d, r.c_raw, r.c_scaled].iter().all(|v| v.is_finite()))
        {
            bail!("episode {bad}: a non-finite J or C (the policy's log-probs overflowed)");
        }
        episode_rewards::write(staging, &rows)?;
        let n = rows.len().max(1) as f64;
        let mean = |f: fn(&EpisodeRewardRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
        let n_rollouts = rollout_rows.len().max(1) as f64;
        // Mean dI and C~ by what the episode does, where the task can tell (spec 5: report C~
        // separately for redundant and useful episodes).
        let mut by_kind: std::collections::BTreeMap<&str, (usize, f64, f64)> = Default::default();
        for (e, rw) in by_rollout.iter().flat_map(|eps| eps.iter()).zip(&rows) {
            let kind = by_kind.entry(episode_kind(&e.text).as_str()).or_default();
            *kind = (kind.0 + 1, kind.1 + rw.d_i, kind.2 + rw.c_scaled);
        }
        let by_kind: serde_json::Map<String, serde_json::Value> = by_kind
            .into_iter()
            .map(|(k, (n, d, c))| {
                (k.to_string(), serde_json::json!({ "episodes": n, "mean_d_i": d / n as f64, "mean_c_scaled": c / n as f64 }))
            })
            .collect();
        Ok(serde_json::json!({
            "scale": scale_metrics,
            "by_kind": by_kind,
            "episodes": rows.len(),
            "mean_j0": j.iter().map(|j| j[0]).sum::<f64>() / n_rollouts,
            "mean_j_final": j.iter().map(|j| j[j.len() - 1]).sum::<f64>() / n_rollouts,
            "mean_d_i": mean(|r| r.d_i),
            "mean_c_raw": mean(|r| r.c_raw),
            "mean_c_scaled": mean(|r| r.c_scaled),
            "d_norm_sq": d_norm_sq,
            "proxy_layer": layer,
            "ranks": ranks,
            "j_seconds": j_seconds,
            "c_seconds": c_seconds,
        }))
    }
}
