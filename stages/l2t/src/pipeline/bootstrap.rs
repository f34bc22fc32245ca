//! `bootstrap`: the base policy, trained (the tiny policy) or imported (a real checkpoint).

use super::prepare::content_hash;
use super::sample::rollout_seed;
use super::{execute, progress_bar, Ctx, Summary};
use crate::config::Source;
use crate::model::tokenizer::{self, EOS, PAD};
use crate::model::{self, chat, Checkpoint, Policy};
use crate::reward::segment::{outcome_reward, segment, span_bytes, token_char_ends};
use crate::sampler::{generate, Request, SamplerParams};
use crate::stage::Stage;
use crate::table::prompts::{self, PromptRow};
use crate::task::episode_kind;
use crate::train::sft::{self, Example, SftParams};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;

/// `bootstrap`: the base policy. `bootstrap.source = "tiny"` trains the tiny policy on the train
/// split's worked solutions; a checkpoint path imports that checkpoint. Either way it then samples
/// the eval split once to report format-valid rate, accuracy and redundant episodes.
pub fn run_bootstrap(ctx: &Ctx) -> Result<Summary> {
    if let Source::Checkpoint(path) = &ctx.config.bootstrap.source {
        return import_base(ctx, path);
    }
    let cfg = &ctx.config;
    let data = ctx.store.open_ref(&ctx.run, Stage::Prepare.name())?;
    let inputs = vec![data.manifest.as_input("data", &[prompts::TRAIN_FILE, prompts::EVAL_FILE])?];
    execute(ctx, Stage::Bootstrap, Stage::Bootstrap.name(), Stage::Bootstrap.params(cfg), inputs, |staging| {
        let train = prompts::read(&data.file(prompts::TRAIN_FILE)?)?;
        let eval = prompts::read(&data.file(prompts::EVAL_FILE)?)?;
        let tok = tokenizer::train(&solution_corpus(&train), cfg.model.vocab_size)?;
        let eos = tokenizer::required_id(&tok, EOS)?;
        let pad = tokenizer::required_id(&tok, PAD)?;
        let examples = sft_examples(&train, &tok)?;
        let longest = examples.iter().map(|e| e.prompt.len() + e.completion.len()).max().unwrap_or(0);
        if longest > cfg.model.max_position_embeddings {
            bail!("a worked solution needs {longest} tokens, more than model.max_position_embeddings");
        }
        let model_cfg = model::tiny_config(&cfg.model, eos);
        let init = model::init_weights(&model_cfg, cfg.seed, &ctx.device)?;
        let b = &cfg.bootstrap;
        let params = SftParams {
            steps: b.steps,
            batch_size: b.batch_size,
            lr: b.lr,
            warmup_frac: b.warmup_frac,
            weight_decay: b.weight_decay,
            max_grad_norm: 1.0,
            seed: cfg.seed,
        };
        let bar = progress_bar(b.steps as u64, "bootstrap");
        let started = Instant::now();
        let (weights, log) = sft::train(&model_cfg, init, &examples, pad, &params, &ctx.device, |s| {
            bar.set_message(format!("loss {:.3}", s.loss));
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        let tokenizer_config = model::tiny_tokenizer_config(cfg.model.max_position_embeddings);
        model::save_checkpoint(staging, &model_cfg, &weights, &tok, &tokenizer_config)?;
        let ckpt = Checkpoint { cfg: model_cfg, weights, tokenizer: tok, tokenizer_config };
        let policy = Policy::from_checkpoint(ckpt, &ctx.device)?;
        let eval_rows: Vec<&PromptRow> = eval.iter().take(b.eval_prompts).collect();
        let figures = eval_figures(ctx, &policy, &eval_rows)?;
        let tokens: usize = log.iter().map(|s| s.tokens).sum();
        let mean_len = |f: fn(&Example) -> usize| examples.iter().map(f).sum::<usize>() as f64 / examples.len() as f64;
        let loss_curve: Vec<f64> = log.iter().step_by((log.len() / 20).max(1)).map(|s| s.loss).collect();
        Ok(serde_json::json!({
            "train_seconds": train_seconds,
            "train_tokens_per_s": tokens as f64 / train_seconds,
            "final_loss": log.last().map(|s| s.loss),
            "mean_prompt_tokens": mean_len(|e| e.prompt.len()),
            "mean_completion_tokens": mean_len(|e| e.completion.len()),
            "loss_curve": loss_curve,
            "eval": figures,
        }))
    })
}

/// Imports a checkpoint (GGUF or Hugging Face directory) as the run's base policy, written as a
/// Hugging Face directory with f32 weights; its key covers the checkpoint's content.
fn import_base(ctx: &Ctx, source: &Path) -> Result<Summary> {
    let cfg = &ctx.config;
    let data = ctx.store.open_ref(&ctx.run, Stage::Prepare.name())?;
    let inputs = vec![data.manifest.as_input("data", &[prompts::EVAL_FILE])?];
    let mut params = Stage::Bootstrap.params(cfg);
    params["source_blake3"] = content_hash(source)?.into();
    execute(ctx, Stage::Bootstrap, Stage::Bootstrap.name(), params, inputs, |staging| {
        let started = Instant::now();
        let ckpt = model::read_checkpoint(source, &ctx.device)?;
        let load_seconds = started.elapsed().as_secs_f64();
        model::save_checkpoint(staging, &ckpt.cfg, &ckpt.weights, &ckpt.tokenizer, &ckpt.tokenizer_config)?;
        let params: usize = ckpt.weights.values().map(|t| t.elem_count()).sum();
        let policy = Policy::from_checkpoint(ckpt, &ctx.device)?;
        let eval = prompts::read(&data.file(prompts::EVAL_FILE)?)?;
        let rows: Vec<&PromptRow> = eval.iter().take(cfg.bootstrap.eval_prompts).collect();
        let figures = if rows.is_empty() { serde_json::Value::Null } else { eval_figures(ctx, &policy, &rows)? };
        Ok(serde_json::json!({
            "source": source.display().to_string(),
            "model_type": policy.cfg.model_type,
            "parameters": params,
            "load_seconds": load_seconds,
            "eval": figures,
        }))
    })
}

/// Prompt + worked-solution texts: the tokenizer's training corpus.
pub fn solution_corpus(rows: &[PromptRow]) -> Vec<String> {
    rows.iter().map(|r| format!("{}{}", r.prompt, r.solution.as_deref().unwrap_or_default())).collect()
}

/// Supervised examples: the prompt's tokens, then the worked solution's and end-of-sequence.
pub fn sft_examples(rows: &[PromptRow], tok: &tokenizers::Tokenizer) -> Result<Vec<Example>> {
    let eos = tokenizer::required_id(tok, EOS)?;
    rows.iter()
        .map(|r| {
            let Some(solution) = &r.solution else { bail!("train row {}: no worked solution to learn from", r.prompt_id) };
            let mut completion = tokenizer::encode(tok, solution)?;
            completion.push(eos);
            Ok(Example { prompt: tokenizer::encode(tok, &r.prompt)?, completion })
        })
        .collect()
}

/// Samples `rows` once each at the bootstrap's eval temperature and reports the targets.
pub fn eval_figures(ctx: &Ctx, policy: &Policy, rows: &[&PromptRow]) -> Result<serde_json::Value> {
    let b = &ctx.config.bootstrap;
    let rule = ctx.config.segment.rule;
    let requests: Vec<Request> = rows
        .iter()
        .map(|r| {
            Ok(Request {
                prompt_ids: chat::prompt_ids(policy, &ctx.config.prompt, &r.prompt)?,
                seed: rollout_seed(ctx.config.seed, u32::MAX, &r.prompt_id, 0),
            })
        })
        .collect::<Result<_>>()?;
    let params = SamplerParams { temperature: b.eval_temperature, top_p: 1.0, max_new_tokens: b.eval_max_new_tokens, ignore_eos: false };
    let started = Instant::now();
    let gens = generate(policy, &requests, &params, ctx.config.sample.batch_rows, |_| {})?;
    let seconds = started.elapsed().as_secs_f64();
    let (mut format_valid, mut correct, mut redundant, mut tokens) = (0usize, 0usize, 0usize, 0usize);
    for (row, g) in rows.iter().zip(&gens) {
        let pieces = tokenizer::decode_pieces(&policy.tokenizer, &g.tokens)?;
        let text = pieces.concat();
        let ends = token_char_ends(&pieces);
        let seg = segment(rule, &text, &ends);
        let out = outcome_reward(&text, &row.gold_answer, g.finish, seg.format_ok, 0.0);
        format_valid += usize::from(seg.well_formed && out.answer.is_some());
        correct += usize::from(out.correct);
        redundant += seg
            .spans
            .iter()
            .filter(|&&span| {
                let (from, to) = span_bytes(&ends, span);
                episode_kind(&text[from..to]).is_filler()
            })
            .count();
        tokens += g.tokens.len();
    }
    let n = rows.len().max(1) as f64;
    Ok(serde_json::json!({
        "prompts": rows.len(),
        "temperature": b.eval_temperature,
        "format_valid_rate": format_valid as f64 / n,
        "accuracy": correct as f64 / n,
        "mean_redundant_episodes": redundant as f64 / n,
        "mean_response_tokens": tokens as f64 / n,
        "sample_tokens_per_s": tokens as f64 / seconds,
    }))
}
