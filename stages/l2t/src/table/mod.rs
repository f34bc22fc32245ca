//! Parquet tables (design.md, "Tables"): one module per table, each with its column names, Arrow
//! schema, row struct, `write`, `read`, and the DuckDB view over it.
//!
//! Writes are byte-deterministic: fixed writer properties (compression, row-group size,
//! `created_by`), rows in the caller's fixed order, and the content hash taken while writing.

pub mod advantages;
pub mod episode_rewards;
pub mod episodes;
pub mod eval_samples;
pub mod eval_summary;
pub mod prompts;
pub mod rollouts;
pub mod update_metrics;

use crate::stage::Stage;
use crate::store::{Caching, Staging, CREATED_BY};
use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, ListArray, StringArray, UInt32Array, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type};
use arrow::record_batch::{RecordBatch, RecordBatchReader};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// A table and the stage that writes it.
pub struct TableDef {
    /// View name.
    pub name: &'static str,
    pub stage: Stage,
    pub file: &'static str,
    pub schema: fn() -> Schema,
}

impl TableDef {
    /// The ref folders that hold the file, as a glob under `runs/<run>/`: an iteration stage's
    /// `iter-*/<stage>`; an evaluation's `evals/<split>/<policy>`.
    pub fn dir(&self) -> String {
        match self.stage {
            Stage::Eval => "evals/*/*".to_string(),
            stage => format!("iter-*/{}", stage.name()),
        }
    }
}

/// Every table the stages write, in DAG order (`prepare`'s splits are the prompts schema too, read
/// through the iterations' `prompts` view).
pub const TABLES: &[TableDef] = &[
    TableDef { name: "prompts", stage: Stage::Sample, file: prompts::ITERATION_FILE, schema: prompts::schema },
    TableDef { name: "rollouts", stage: Stage::Sample, file: rollouts::FILE, schema: rollouts::schema },
    TableDef { name: "episodes", stage: Stage::Segment, file: episodes::FILE, schema: episodes::schema },
    TableDef { name: "episode_rewards", stage: Stage::FisherReward, file: episode_rewards::FILE, schema: episode_rewards::schema },
    TableDef { name: "advantages", stage: Stage::CreditAssign, file: advantages::FILE, schema: advantages::schema },
    TableDef { name: "update_metrics", stage: Stage::GrpoUpdate, file: update_metrics::FILE, schema: update_metrics::schema },
    // Evaluations sit under evals/<split>/<policy>; `iteration` is the policy's (NULL for base).
    TableDef { name: "eval_samples", stage: Stage::Eval, file: eval_samples::FILE, schema: eval_samples::schema },
    TableDef { name: "eval_summary", stage: Stage::Eval, file: eval_summary::FILE, schema: eval_summary::schema },
];

/// `CREATE VIEW` text for a table over every run's refs under `artifacts`, with `run` and
/// `iteration` columns (taken from the path where the table has no `iteration` of its own).
pub fn duckdb_view(def: &TableDef, artifacts: &str) -> String {
    let schema = (def.schema)();
    let has_iteration = schema.fields().iter().any(|f| f.name() == "iteration");
    let mut cols = vec!["regexp_extract(filename, 'runs/([^/]+)/', 1) AS run".to_string()];
    if !has_iteration {
        cols.push("TRY_CAST(regexp_extract(filename, '/iter-([0-9]+)/', 1) AS INTEGER) AS iteration".into());
    }
    cols.extend(schema.fields().iter().map(|f| format!("\"{}\"", f.name())));
    format!(
        "CREATE OR REPLACE VIEW {} AS SELECT {} FROM read_parquet('{}/runs/*/{}/{}', filename = true);",
        def.name,
        cols.join(", "),
        artifacts,
        def.dir(),
        def.file
    )
}

/// Writes one table into a stage's staging folder, hashing it as it goes.
pub fn write_table(staging: &mut Staging, file: &str, schema: Schema, columns: Vec<ArrayRef>) -> Result<()> {
    let schema: SchemaRef = Arc::new(schema);
    let batch = RecordBatch::try_new(schema.clone(), columns).with_context(|| format!("{file}: building the record batch"))?;
    let rows = batch.num_rows() as u64;
    let sink = staging.create(file, Caching::Cached)?;
    let mut writer = ArrowWriter::try_new(sink, schema, Some(writer_properties()))?;
    writer.write(&batch).with_context(|| format!("{file}: write failed"))?;
    let sink = writer.into_inner().with_context(|| format!("{file}: closing the Parquet writer"))?;
    staging.record(file, sink, Some(rows))
}

/// Writes a table to a plain path outside the store (prepared inputs such as `make data`'s),
/// through a temporary file renamed into place.
pub fn write_table_at(path: &Path, schema: Schema, columns: Vec<ArrayRef>) -> Result<()> {
    let name = path.display().to_string();
    let schema: SchemaRef = Arc::new(schema);
    let batch = RecordBatch::try_new(schema.clone(), columns).with_context(|| format!("{name}: building the record batch"))?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(writer_properties()))?;
    writer.write(&batch).with_context(|| format!("{name}: write failed"))?;
    writer.close().with_context(|| format!("{name}: closing the Parquet writer"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{name}: cannot rename into place"))
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(8192))
        .set_created_by(CREATED_BY.to_string())
        .build()
}

/// A whole table read into memory, with typed column access whose errors name the file and column.
pub struct TableReader {
    pub name: String,
    batch: RecordBatch,
}

impl TableReader {
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).with_context(|| format!("{name}: cannot open"))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{name}: not a readable Parquet file"))?
            .with_batch_size(8192)
            .build()
            .with_context(|| format!("{name}: not a readable Parquet file"))?;
        let schema = reader.schema();
        let batches: Vec<RecordBatch> =
            reader.collect::<std::result::Result<_, _>>().with_context(|| format!("{name}: corrupt Parquet data"))?;
        let batch = arrow::compute::concat_batches(&schema, &batches)?;
        Ok(Self { name, batch })
    }

    pub fn rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// Whether the table has the column (for columns added after files were written).
    pub fn has(&self, col: &str) -> bool {
        self.batch.column_by_name(col).is_some()
    }

    fn column(&self, col: &str, want: &str) -> Result<&ArrayRef> {
        let array = self.batch.column_by_name(col).ok_or_else(|| anyhow!("{}: missing column {col:?} (expected {want})", self.name))?;
        if array.null_count() > 0 && !col_nullable(col) {
            let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
            bail!("{}: column {col}: row {row}: unexpected null", self.name);
        }
        Ok(array)
    }

    fn typed<'a, T: 'static>(&'a self, col: &str, want: &str, array: &'a ArrayRef) -> Result<&'a T> {
        array
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| anyhow!("{}: column {col}: has type {}, expected {want}", self.name, array.data_type()))
    }

    pub fn str(&self, col: &str) -> Result<Vec<String>> {
        let a = self.column(col, "utf8")?;
        let a: &StringArray = self.typed(col, "utf8", a)?;
        Ok(a.iter().map(|v| v.unwrap_or_default().to_string()).collect())
    }

    pub fn opt_str(&self, col: &str) -> Result<Vec<Option<String>>> {
        let a = self.column(col, "utf8")?;
        let a: &StringArray = self.typed(col, "utf8", a)?;
        Ok(a.iter().map(|v| v.map(str::to_string)).collect())
    }

    pub fn u32(&self, col: &str) -> Result<Vec<u32>> {
        let a = self.column(col, "uint32")?;
        Ok(self.typed::<UInt32Array>(col, "uint32", a)?.values().to_vec())
    }

    pub fn u64(&self, col: &str) -> Result<Vec<u64>> {
        let a = self.column(col, "uint64")?;
        Ok(self.typed::<UInt64Array>(col, "uint64", a)?.values().to_vec())
    }

    pub fn bool(&self, col: &str) -> Result<Vec<bool>> {
        let a = self.column(col, "bool")?;
        Ok(self.typed::<BooleanArray>(col, "bool", a)?.iter().map(|v| v.unwrap_or(false)).collect())
    }

    /// A float column; NaN and infinities are refused with their row.
    pub fn f32(&self, col: &str) -> Result<Vec<f32>> {
        let a = self.column(col, "float32")?;
        let values = self.typed::<Float32Array>(col, "float32", a)?.values().to_vec();
        self.check_finite(col, values.iter().map(|&v| f64::from(v)).enumerate())?;
        Ok(values)
    }

    /// A double column; NaN and infinities are refused with their row.
    pub fn f64(&self, col: &str) -> Result<Vec<f64>> {
        let a = self.column(col, "float64")?;
        let values = self.typed::<Float64Array>(col, "float64", a)?.values().to_vec();
        self.check_finite(col, values.iter().copied().enumerate())?;
        Ok(values)
    }

    /// A double column whose nulls are figures not measured; NaN and infinities are refused.
    pub fn opt_f64(&self, col: &str) -> Result<Vec<Option<f64>>> {
        let a = self.column(col, "float64")?;
        let values: Vec<Option<f64>> = self.typed::<Float64Array>(col, "float64", a)?.iter().collect();
        self.check_finite(col, values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))))?;
        Ok(values)
    }

    pub fn list_u32(&self, col: &str) -> Result<Vec<Vec<u32>>> {
        let a = self.column(col, "list<uint32>")?;
        let list: &ListArray = self.typed(col, "list<uint32>", a)?;
        if list.value_type() != DataType::UInt32 {
            bail!("{}: column {col}: has type {}, expected list<uint32>", self.name, a.data_type());
        }
        Ok((0..list.len()).map(|i| list.value(i).as_primitive::<UInt32Type>().values().to_vec()).collect())
    }

    /// A list-of-float column; NaN and infinities are refused with their row.
    pub fn list_f32(&self, col: &str) -> Result<Vec<Vec<f32>>> {
        let a = self.column(col, "list<float32>")?;
        let list: &ListArray = self.typed(col, "list<float32>", a)?;
        if list.value_type() != DataType::Float32 {
            bail!("{}: column {col}: has type {}, expected list<float32>", self.name, a.data_type());
        }
        let rows: Vec<Vec<f32>> = (0..list.len()).map(|i| list.value(i).as_primitive::<Float32Type>().values().to_vec()).collect();
        self.check_finite(col, rows.iter().enumerate().flat_map(|(i, r)| r.iter().map(move |&v| (i, f64::from(v)))))?;
        Ok(rows)
    }

    fn check_finite(&self, col: &str, values: impl Iterator<Item = (usize, f64)>) -> Result<()> {
        for (row, v) in values {
            if !v.is_finite() {
                bail!("{}: column {col}: row {row}: {v} is not a finite number", self.name);
            }
        }
        Ok(())
    }
}

/// Columns that may hold nulls (an answer that could not be parsed, a prompt without a solution).
fn col_nullable(col: &str) -> bool {
    matches!(col, "answer" | "solution" | "logp_mismatch_mean" | "logp_mismatch_max")
}

// Array builders shared by the table modules.

pub fn utf8(values: impl IntoIterator<Item = impl AsRef<str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

pub fn opt_utf8(values: &[Option<String>]) -> ArrayRef {
    Arc::new(StringArray::from_iter(values.iter().map(|v| v.as_deref())))
}

pub fn u32s(values: impl IntoIterator<Item = u32>) -> ArrayRef {
    Arc::new(UInt32Array::from_iter_values(values))
}

pub fn u64s(values: impl IntoIterator<Item = u64>) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(values))
}

pub fn f32s(values: impl IntoIterator<Item = f32>) -> ArrayRef {
    Arc::new(Float32Array::from_iter_values(values))
}

pub fn f64s(values: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(values))
}

/// A double column with nulls (a figure not measured).
pub fn opt_f64s(values: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from_iter(values))
}

pub fn bools(values: impl IntoIterator<Item = bool>) -> ArrayRef {
    Arc::new(BooleanArray::from_iter(values.into_iter().map(Some)))
}

fn list_of(rows: &[Vec<impl Copy>], values: ArrayRef, item: DataType) -> ArrayRef {
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(Vec::len));
    let field = Arc::new(Field::new("item", item, false));
    Arc::new(ListArray::new(field, offsets, values, None))
}

pub fn list_u32(rows: &[Vec<u32>]) -> ArrayRef {
    list_of(rows, u32s(rows.iter().flatten().copied()), DataType::UInt32)
}

pub fn list_f32(rows: &[Vec<f32>]) -> ArrayRef {
    list_of(rows, f32s(rows.iter().flatten().copied()), DataType::Float32)
}

/// Schema field of a list column (items not null).
pub fn list_field(name: &str, item: DataType) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", item, false))), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Manifest, Store};
    use crate::table::rollouts::{FinishReason, RolloutRow};

    fn rollout(prompt_id: &str, tokens: Vec<u32>) -> RolloutRow {
        RolloutRow {
            iteration: 0,
            prompt_id: prompt_id.into(),
            sample_idx: 1,
            prompt_token_ids: vec![5, 6],
            logprobs: tokens.iter().map(|&t| -(t as f32) / 10.0).collect(),
            token_ids: tokens,
            text: "ab".into(),
            finish_reason: FinishReason::Stop,
            seed: 9,
            temperature: 1.0,
            top_p: 0.9,
            policy_hash: "h".into(),
        }
    }

    /// Writes rollouts into a fresh store entry; returns the file path and its hash.
    fn write_rollouts(store: &Store, key: &str, rows: &[RolloutRow]) -> (std::path::PathBuf, String) {
        let mut staging = store.begin(key).unwrap();
        rollouts::write(&mut staging, rows).unwrap();
        let manifest = Manifest::new("sample", 1, key, serde_json::json!({}), vec![], 0);
        let art = staging.publish(manifest).unwrap();
        let hash = art.manifest.output(rollouts::FILE).unwrap().blake3.clone();
        (art.file(rollouts::FILE).unwrap(), hash)
    }

    #[test]
    fn rollouts_round_trip_and_same_rows_give_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let rows = vec![rollout("p1", vec![1, 2, 3]), rollout("p2", vec![4])];
        let (path, hash) = write_rollouts(&store, "a", &rows);
        assert_eq!(rollouts::read(&path).unwrap(), rows);
        let (_, again) = write_rollouts(&store, "b", &rows);
        assert_eq!(hash, again);
    }

    /// The mismatch columns hold nulls where the update did not measure it, and read back so.
    #[test]
    fn update_metrics_round_trip_with_and_without_the_mismatch() {
        use update_metrics::{StepMetrics, UpdateMetricsRow};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let step = |n: u64| StepMetrics { step: n, lr: 1e-4, loss: -0.5, tokens: 10, sequences: 2, ..Default::default() };
        let rows = vec![
            UpdateMetricsRow { iteration: 0, step: step(1), logp_mismatch_mean: None, logp_mismatch_max: None },
            UpdateMetricsRow { iteration: 1, step: step(2), logp_mismatch_mean: Some(2e-7), logp_mismatch_max: Some(3e-6) },
        ];
        let mut staging = store.begin("m").unwrap();
        update_metrics::write(&mut staging, &rows).unwrap();
        let art = staging.publish(Manifest::new("grpo-update", 1, "m", serde_json::json!({}), vec![], 0)).unwrap();
        assert_eq!(update_metrics::read(&art.file(update_metrics::FILE).unwrap()).unwrap(), rows);
    }

    #[test]
    fn malformed_tables_are_refused_with_file_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        // An empty response.
        let (path, _) = write_rollouts(&store, "empty", &[rollout("p1", vec![1]), rollout("p2", vec![])]);
        let err = format!("{:#}", rollouts::read(&path).unwrap_err());
        assert!(err.contains("rollouts.parquet") && err.contains("row 1") && err.contains("empty response"), "{err}");
        // NaN in a float column.
        let mut bad = rollout("p1", vec![1, 2]);
        bad.logprobs[1] = f32::NAN;
        let (path, _) = write_rollouts(&store, "nan", &[bad]);
        let err = format!("{:#}", rollouts::read(&path).unwrap_err());
        assert!(err.contains("column logprobs: row 0") && err.contains("NaN"), "{err}");
        // A table without a column the reader needs.
        let (path, _) = write_rollouts(&store, "ok", &[rollout("p1", vec![1])]);
        let err = format!("{:#}", episodes::read(&path).unwrap_err());
        assert!(err.contains("missing column \"episode_idx\""), "{err}");
        // A truncated file and a missing one.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.parquet");
        std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
        let err = format!("{:#}", rollouts::read(&cut).unwrap_err());
        assert!(err.contains("cut.parquet") && err.contains("Parquet"), "{err}");
        let err = format!("{:#}", rollouts::read(&dir.path().join("none.parquet")).unwrap_err());
        assert!(err.contains("none.parquet") && err.contains("cannot open"), "{err}");
    }

    #[test]
    fn nan_or_inf_in_any_reward_column_is_refused_with_column_and_row() {
        use episode_rewards::EpisodeRewardRow;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let row = EpisodeRewardRow {
            iteration: 0,
            prompt_id: "p".into(),
            sample_idx: 0,
            episode_idx: 0,
            j_before: 0.1,
            j_after: 0.2,
            d_i: 0.1,
            g_dot_d: 0.0,
            c_raw: 0.0,
            c_scaled: 0.0,
            estimator: "fd".into(),
        };
        type Spoil = fn(&mut EpisodeRewardRow);
        let columns: [(&str, Spoil); 6] = [
            ("j_before", |r| r.j_before = f64::NAN),
            ("j_after", |r| r.j_after = f64::INFINITY),
            ("d_i", |r| r.d_i = f64::NAN),
            ("g_dot_d", |r| r.g_dot_d = f64::NEG_INFINITY),
            ("c_raw", |r| r.c_raw = f64::NAN),
            ("c_scaled", |r| r.c_scaled = f64::INFINITY),
        ];
        for (i, (col, spoil)) in columns.iter().enumerate() {
            let mut bad = row.clone();
            spoil(&mut bad);
            let key = format!("k{i}");
            let mut staging = store.begin(&key).unwrap();
            episode_rewards::write(&mut staging, &[row.clone(), bad]).unwrap();
            let art = staging.publish(Manifest::new("fisher-reward", 1, &key, serde_json::json!({}), vec![], 0)).unwrap();
            let err = format!("{:#}", episode_rewards::read(&art.file(episode_rewards::FILE).unwrap()).unwrap_err());
            assert!(err.contains(&format!("column {col}: row 1")) && err.contains("not a finite number"), "{err}");
        }
        // The advantages table refuses a non-finite token advantage the same way.
        let adv = advantages::AdvantageRow {
            iteration: 0,
            prompt_id: "p".into(),
            sample_idx: 0,
            method: "l2t".into(),
            r_episode: vec![0.5],
            w: vec![1.0],
            r_t: vec![0.5],
            a_t: vec![f32::NAN],
            rbar: 0.5,
            a_i: 1.0,
            n_clipped: 0,
            guard_binds: false,
            zero_std: false,
            excluded: false,
        };
        let mut staging = store.begin("adv").unwrap();
        advantages::write(&mut staging, &[adv]).unwrap();
        let art = staging.publish(Manifest::new("credit-assign", 1, "adv", serde_json::json!({}), vec![], 0)).unwrap();
        let err = format!("{:#}", advantages::read(&art.file(advantages::FILE).unwrap()).unwrap_err());
        assert!(err.contains("column a_t: row 0"), "{err}");
    }

    #[test]
    fn views_list_every_schema_column_plus_run_and_iteration() {
        for def in TABLES {
            let view = duckdb_view(def, "artifacts");
            for f in (def.schema)().fields() {
                assert!(view.contains(&format!("\"{}\"", f.name())), "{}: {view}", def.name);
            }
            assert!(view.contains("AS run"));
            assert!(view.contains("iteration"));
            assert!(view.contains(&format!("/{}/{}'", def.dir(), def.file)));
        }
    }
}
