//! The closed knobs: each value a knob may take is one variant, parsed once when the
//! configuration is read (an unknown value is refused with the knob's name and the values it
//! takes) and written back as the same text, so manifests and stage keys read as before.

use anyhow::{bail, Context, Result};
use std::fmt;

/// Serde through the knob's text (`FromStr` and `Display`): `pipeline.toml`, manifests and stage
/// keys hold the words users write.
macro_rules! text_knob {
    ($name:ident) => {
        impl TryFrom<String> for $name {
            type Error = anyhow::Error;
            fn try_from(text: String) -> Result<Self> {
                text.parse()
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.to_string()
            }
        }
    };
}

/// A closed knob: an enum whose variants are written as fixed words in `pipeline.toml`.
macro_rules! knob {
    ($(#[$meta:meta])* $name:ident = $key:literal { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// The words this knob takes, in declaration order.
            pub const VALUES: &'static [&'static str] = &[$($text),+];

            /// The word for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = anyhow::Error;
            fn from_str(text: &str) -> Result<Self> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    other => bail!("unknown {} {other:?} (expected {})", $key, Self::VALUES.join(", ")),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        text_knob!($name);
    };
}

knob! {
    /// The built-in task `prepare` generates (`task.kind`).
    TaskKind = "task.kind" {
        /// Chains of arithmetic operations with redundant "Check:" episodes.
        Arith = "arith",
        /// The testbed: walks with useful and filler decomposition episodes (docs/testbed.md).
        Decompose = "decompose",
    }
}

knob! {
    /// How a generated problem is asked (`task.prompt_style`).
    PromptStyle = "task.prompt_style" {
        /// The prompt carries the episode-format line (for the tiny policy).
        Completion = "completion",
        /// A bare question (for chat models, with `prompt.instructions`).
        Question = "question",
    }
}

knob! {
    /// How a prompt reaches the policy (`prompt.template`).
    Template = "prompt.template" {
        /// The prompt text as is.
        Raw = "raw",
        /// Through the checkpoint's chat template.
        Chat = "chat",
    }
}

knob! {
    /// How the answer tokens' probabilities combine into `J` (`reward.j_mode`).
    JMode = "reward.j_mode" {
        /// Product of the answer tokens' probabilities (default).
        Prob = "prob",
        /// Geometric mean of them (length-neutral).
        Geomean = "geomean",
    }
}

knob! {
    /// How `g . D~` is computed (`penalty.estimator`).
    Estimator = "penalty.estimator" {
        /// Exact, one forward-mode pass for every episode at once: the tangent of the proxy
        /// block's output along `D~`, carried to each token's log-probability, in f32 (default).
        Jvp = "jvp",
        /// Central finite difference, two passes for all rollouts, in f64 (the spec's default).
        Fd = "fd",
        /// Exact, one backward pass per episode through the proxy block.
        Grad = "grad",
    }
}

knob! {
    /// The precision of the gradient-free passes (`dtype`): sampling, fisher-reward's `J` and
    /// `dI`, eval. Training, the penalty and the update's `logp_old` stay f32 (or f64).
    #[derive(Default)]
    Precision = "dtype" {
        /// f32 everywhere (default; the CPU backend's kernels are f32).
        #[default]
        F32 = "f32",
        /// bf16 weights and activations, f32 logits: half the bytes a decode step reads (on a GPU).
        Bf16 = "bf16",
    }
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

knob! {
    /// How raw `C` is put on the scale of `dI` (`penalty.scale`, spec 5 revised 2026-12-01).
    Scale = "penalty.scale" {
        /// Cap at a quantile of the nonzero `C`, then scale so that the batch's mean penalty
        /// equals its mean `|dI|`: `beta` is the penalty-to-gain ratio (default).
        GainMatched = "gain-matched",
        /// Divide by the median of the batch's nonzero `C` (the first reading; an ablation).
        BatchMedian = "batch-median",
        /// Keep the raw values.
        None = "none",
    }
}

knob! {
    /// Which signal becomes the advantage (`credit.method`). Every method reads the same
    /// artifacts, so a baseline is one config change away.
    Method = "credit.method" {
        /// Dense L2T credit (l2t-spec 6-7; default).
        L2t = "l2t",
        /// GRPO on the outcome reward alone: `A_t = (r_out_i - mean) / (std + 1e-6)`.
        Outcome = "outcome",
        /// Arora & Zanette: `r_i = r_out_i (1 - a_lp sigmoid((len_i - mean_c) / std_c))` over
        /// the group's correct responses, then GRPO.
        LengthPenalty = "length-penalty",
        /// MRT-style progress bonus: `r_i = r_out_i + alpha sum_k dI(i,k)`, then GRPO.
        Mrt = "mrt",
    }
}

knob! {
    /// How a rollout's advantage is spread over its tokens (`credit.token_scale`).
    TokenScale = "credit.token_scale" {
        /// The paper's relative contribution `A_i r_t / mu_i`, guarded near `mu_i = 0` and
        /// shifted after the clip so that a rollout's mean token advantage is exactly `A_i`
        /// (default).
        Regularised = "regularised",
        /// `A_i clip(r_t / (rbar_i +- 1e-6), -c, c)`: the paper's ratio, `rbar_i` kept away from 0.
        Signed = "signed",
        /// `A_t = A_i`: the L2T reward with GRPO's credit (isolates the dense credit).
        Rollout = "rollout",
        /// `A_i clip(r_t / (|rbar_i| + 1e-6), -c, c)`, the first reading: when `rbar_i < 0` a
        /// typical token's ratio is -1, so `A_t` takes the sign opposite to `A_i`.
        Abs = "abs",
    }
}

knob! {
    /// How token losses become the minibatch loss (`update.loss_agg`).
    LossAgg = "update.loss_agg" {
        /// Sum over all tokens / number of tokens in the minibatch (DAPO; default).
        TokenMean = "token-mean",
        /// Mean over sequences of each sequence's token mean (original GRPO).
        SeqMeanTokenMean = "seq-mean-token-mean",
        /// Sum over all tokens / (sequences * max_new_tokens) (Dr. GRPO: no length normalisation).
        DrGrpo = "dr-grpo",
    }
}

knob! {
    /// How a response's final answer is read (`eval.answer`; the RL reward always reads `boxed`).
    AnswerExtraction = "eval.answer" {
        /// The last `\boxed{}` (or `\fbox{}`); a response without one has no answer.
        Boxed = "boxed",
        /// The last box, else the last stated answer ("the answer is ..", "Final Answer: ..", a
        /// bold answer, the last formula), as math-verify reads a response.
        Stated = "stated",
    }
}

/// How responses are cut into episodes (`segment.rule`): `tags`, `paragraphs` or `chunks:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Rule {
    /// `<episode_k>` tags (default).
    Tags,
    /// Blank-line paragraphs, a new episode at a paragraph opening with a reflection cue (MRT).
    Paragraphs,
    /// Fixed spans of N tokens (VinePPO).
    Chunks(usize),
}

impl std::str::FromStr for Rule {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "tags" => Ok(Rule::Tags),
            "paragraphs" => Ok(Rule::Paragraphs),
            _ => {
                let n = text
                    .strip_prefix("chunks:")
                    .with_context(|| format!("unknown segment.rule {text:?} (expected tags, paragraphs or chunks:N)"))?;
                let n: usize = n.parse().with_context(|| format!("segment.rule chunks:N needs a positive integer, got {n:?}"))?;
                if n == 0 {
                    bail!("segment.rule chunks:N needs a positive integer, got 0");
                }
                Ok(Rule::Chunks(n))
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Tags => f.write_str("tags"),
            Rule::Paragraphs => f.write_str("paragraphs"),
            Rule::Chunks(n) => write!(f, "chunks:{n}"),
        }
    }
}

text_knob!(Rule);

/// Where the policy's passes run (`device`): `cpu`, or `cuda:N` (a build with the `cuda` feature).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = text.strip_prefix("cuda:").with_context(|| format!("unknown device {text:?} (expected cpu or cuda:N)"))?;
                Ok(DeviceSpec::Cuda(n.parse().with_context(|| format!("device cuda:N needs a GPU index, got {n:?}"))?))
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

text_knob!(DeviceSpec);

/// Where the base policy comes from (`bootstrap.source`): `tiny` (train the tiny policy on the
/// task) or the path of a checkpoint to import (a `.gguf` file or a Hugging Face directory).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Source {
    Tiny,
    Checkpoint(std::path::PathBuf),
}

impl TryFrom<String> for Source {
    type Error = anyhow::Error;
    fn try_from(text: String) -> Result<Self> {
        match text.as_str() {
            "" => bail!("bootstrap.source must be tiny or a checkpoint path"),
            "tiny" => Ok(Source::Tiny),
            _ => Ok(Source::Checkpoint(text.into())),
        }
    }
}

impl From<Source> for String {
    fn from(source: Source) -> String {
        match source {
            Source::Tiny => "tiny".into(),
            Source::Checkpoint(path) => path.display().to_string(),
        }
    }
}

/// An optional file knob written as a path, or `""` for none (`task.eval_file`): TOML has no null.
pub mod optional_path {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::path::PathBuf;

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let text = String::deserialize(d)?;
        Ok((!text.is_empty()).then(|| text.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_parses_to_its_variant_and_back() {
        for text in Method::VALUES {
            assert_eq!(text.parse::<Method>().unwrap().as_str(), *text);
        }
        assert_eq!("length-penalty".parse::<Method>().unwrap(), Method::LengthPenalty);
        assert_eq!("gain-matched".parse::<Scale>().unwrap(), Scale::GainMatched);
        assert_eq!(LossAgg::SeqMeanTokenMean.to_string(), "seq-mean-token-mean");
        let err = "up".parse::<TokenScale>().unwrap_err().to_string();
        assert_eq!(err, "unknown credit.token_scale \"up\" (expected regularised, signed, rollout, abs)");
    }

    #[test]
    fn devices_parse_and_print_alike() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap().to_string(), "cuda:0");
        for bad in ["gpu", "cuda:x", "cuda:", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_parse_and_print_alike() {
        assert_eq!("tags".parse::<Rule>().unwrap(), Rule::Tags);
        assert_eq!("chunks:16".parse::<Rule>().unwrap(), Rule::Chunks(16));
        assert_eq!(Rule::Chunks(16).to_string(), "chunks:16");
        for bad in ["chunks:0", "chunks:x", "lines", ""] {
            assert!(bad.parse::<Rule>().unwrap_err().to_string().contains("segment.rule"), "{bad}");
        }
    }

    #[test]
    fn a_source_and_an_optional_path_read_and_write_as_before() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Knobs {
            source: Source,
            #[serde(with = "optional_path")]
            file: Option<std::path::PathBuf>,
        }
        for (json, want) in [
            (r#"{"source":"tiny","file":""}"#, Knobs { source: Source::Tiny, file: None }),
            (
                r#"{"source":"m/x.gguf","file":"d/p.parquet"}"#,
                Knobs { source: Source::Checkpoint("m/x.gguf".into()), file: Some("d/p.parquet".into()) },
            ),
        ] {
            let knobs: Knobs = serde_json::from_str(json).unwrap();
            assert_eq!(knobs, want);
            assert_eq!(serde_json::to_string(&knobs).unwrap(), json);
        }
        let err = serde_json::from_str::<Knobs>(r#"{"source":"","file":""}"#).unwrap_err().to_string();
        assert!(err.contains("bootstrap.source"), "{err}");
    }

    #[test]
    fn knobs_serialise_as_their_words() {
        // The words, not the variant names: manifests and stage keys read as before typing.
        let v = serde_json::json!({ "m": Method::LengthPenalty, "r": Rule::Chunks(4), "a": AnswerExtraction::Stated });
        assert_eq!(v.to_string(), r#"{"a":"stated","m":"length-penalty","r":"chunks:4"}"#);
        let back: Method = serde_json::from_value(serde_json::json!("mrt")).unwrap();
        assert_eq!(back, Method::Mrt);
        assert!(serde_json::from_value::<Method>(serde_json::json!("grpo")).is_err());
    }
}
