//! The update_metrics table: the training log of `grpo-update`, one row per optimizer step
//! (l2t-spec section 8). Throughput is wall-clock, so it lives in the stage's manifest instead
//! (tables stay byte-deterministic).

use super::{f64s, opt_f64s, u32s, u64s, TableReader};
use crate::store::Staging;
use anyhow::Result;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

/// One optimizer step's figures (the rows of `update_metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u32,
    pub minibatch: u32,
    pub lr: f64,
    pub loss: f64,
    pub pg_loss: f64,
    pub kl_loss: f64,
    /// Mean k3 over the minibatch's tokens.
    pub kl: f64,
    /// Share of tokens whose ratio was clipped on the side that stops the gradient.
    pub clip_frac: f64,
    pub ratio_mean: f64,
    pub grad_norm: f64,
    /// Trainable tensors that received a gradient in this step.
    pub tensors_with_grad: u32,
    pub sequences: u32,
    pub tokens: u64,
}

pub const FILE: &str = "update_metrics.parquet";

/// The float columns, in schema order: [`StepMetrics`]' figures, then the iteration-wide
/// sampler-vs-recomputed log-prob mismatch (null where the update did not score its batch first:
/// `update.audit_logp_old`).
const F64_COLS: [&str; 8] = ["lr", "loss", "pg_loss", "kl_loss", "kl", "clip_frac", "ratio_mean", "grad_norm"];
const MISMATCH_COLS: [&str; 2] = ["logp_mismatch_mean", "logp_mismatch_max"];

pub fn schema() -> Schema {
    let mut fields = vec![
        Field::new("iteration", DataType::UInt32, false),
        Field::new("step", DataType::UInt64, false),
        Field::new("epoch", DataType::UInt32, false),
        Field::new("minibatch", DataType::UInt32, false),
        Field::new("sequences", DataType::UInt32, false),
        Field::new("tensors_with_grad", DataType::UInt32, false),
        Field::new("tokens", DataType::UInt64, false),
    ];
    fields.extend(F64_COLS.iter().map(|c| Field::new(*c, DataType::Float64, false)));
    fields.extend(MISMATCH_COLS.iter().map(|c| Field::new(*c, DataType::Float64, true)));
    Schema::new(fields)
}

/// One optimizer step of one iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMetricsRow {
    pub iteration: u32,
    pub step: StepMetrics,
    /// Mean and max |log-prob the sampler recorded - log-prob recomputed by the update|.
    pub logp_mismatch_mean: Option<f64>,
    pub logp_mismatch_max: Option<f64>,
}

pub fn write(staging: &mut Staging, rows: &[UpdateMetricsRow]) -> Result<()> {
    let f64_of = |f: fn(&UpdateMetricsRow) -> f64| f64s(rows.iter().map(f));
    let columns = vec![
        u32s(rows.iter().map(|r| r.iteration)),
        u64s(rows.iter().map(|r| r.step.step)),
        u32s(rows.iter().map(|r| r.step.epoch)),
        u32s(rows.iter().map(|r| r.step.minibatch)),
        u32s(rows.iter().map(|r| r.step.sequences)),
        u32s(rows.iter().map(|r| r.step.tensors_with_grad)),
        u64s(rows.iter().map(|r| r.step.tokens)),
        f64_of(|r| r.step.lr),
        f64_of(|r| r.step.loss),
        f64_of(|r| r.step.pg_loss),
        f64_of(|r| r.step.kl_loss),
        f64_of(|r| r.step.kl),
        f64_of(|r| r.step.clip_frac),
        f64_of(|r| r.step.ratio_mean),
        f64_of(|r| r.step.grad_norm),
        opt_f64s(rows.iter().map(|r| r.logp_mismatch_mean)),
        opt_f64s(rows.iter().map(|r| r.logp_mismatch_max)),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

pub fn read(path: &Path) -> Result<Vec<UpdateMetricsRow>> {
    let t = TableReader::open(path)?;
    let (iteration, step, epoch, minibatch) = (t.u32("iteration")?, t.u64("step")?, t.u32("epoch")?, t.u32("minibatch")?);
    let (sequences, tensors_with_grad, tokens) = (t.u32("sequences")?, t.u32("tensors_with_grad")?, t.u64("tokens")?);
    let f: Vec<Vec<f64>> = F64_COLS.iter().map(|c| t.f64(c)).collect::<Result<_>>()?;
    let (mismatch_mean, mismatch_max) = (t.opt_f64(MISMATCH_COLS[0])?, t.opt_f64(MISMATCH_COLS[1])?);
    Ok((0..t.rows())
        .map(|i| UpdateMetricsRow {
            iteration: iteration[i],
            step: StepMetrics {
                step: step[i],
                epoch: epoch[i],
                minibatch: minibatch[i],
                sequences: sequences[i],
                tensors_with_grad: tensors_with_grad[i],
                tokens: tokens[i],
                lr: f[0][i],
                loss: f[1][i],
                pg_loss: f[2][i],
                kl_loss: f[3][i],
                kl: f[4][i],
                clip_frac: f[5][i],
                ratio_mean: f[6][i],
                grad_norm: f[7][i],
            },
            logp_mismatch_mean: mismatch_mean[i],
            logp_mismatch_max: mismatch_max[i],
        })
        .collect())
}
