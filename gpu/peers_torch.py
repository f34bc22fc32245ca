"""The peers of the device check's timings: PyTorch + transformers on the same device, the same
workloads as `bench` (after shared/bench/peers, the CPU peer scripts, adapted to a device and to
random weights in real models' shapes):

  {shape}-generate-b{1,16,64}-fixed  HF generate, do_sample, temperature 0.9, top_k 0, KV cache,
                                     --new-tokens (min_new_tokens = max), 4 prompts of 44/40/41/38
                                     random ids x batch/4 samples (batch 1: the first prompt)
  {shape}-score                      teacher-forced per-token log-probs of --score-shape random
                                     ids (rows x tokens), 16 rows per pass as ours
  {shape}-train-step                 forward + backward + AdamW on --train-shape, f32, one pass

Sampling and scoring run in f32 and bf16, the train step in f32. One JSON line per workload.
"""
import argparse, json, statistics, time

import torch
import transformers

SHAPES = {
    # config.json of HuggingFaceTB/SmolLM2-135M-Instruct (Llama) and Qwen/Qwen2.5-1.5B (Qwen2).
    'smollm2-shape': ('llama', dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    'qwen2.5-1.5b-shape': ('qwen2', dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # The CPU peers' tiny Qwen2 (shared/bench/peers/common.py), for dry runs.
    'tiny-qwen2': ('qwen2', dict(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}
PROMPT_LENS = [44, 40, 41, 38]

ap = argparse.ArgumentParser()
ap.add_argument('--device', default='cuda')
ap.add_argument('--shape', required=True, choices=sorted(SHAPES))
ap.add_argument('--reps', type=int, default=3)
ap.add_argument('--new-tokens', type=int, default=128)
shape_arg = lambda text: tuple(int(x) for x in text.split('x'))
ap.add_argument('--score-shape', type=shape_arg, default=(16, 256))
ap.add_argument('--train-shape', type=shape_arg, default=(16, 256))
args = ap.parse_args()
dev = torch.device(args.device)


def sync():
    if dev.type == 'cuda':
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def peak_mb():
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == 'cuda' else None


def emit(d):
    print(json.dumps(dict(d, peer='pytorch', torch=torch.__version__, transformers=transformers.__version__,
                          device=str(dev), peak_gpu_mb=peak_mb())), flush=True)


def build(dtype):
    family, kw = SHAPES[args.shape]
    cls = {'llama': transformers.LlamaConfig, 'qwen2': transformers.Qwen2Config}[family]
    cfg = cls(**kw, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(dev):  # drawn on the device: a 1.5B model in a moment
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    return model.eval(), cfg


def prompts(cfg):
    g = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENS)
    ids = torch.full((len(PROMPT_LENS), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(PROMPT_LENS):
        ids[i, width - n:] = torch.randint(3, cfg.vocab_size, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids.to(dev), mask.to(dev)


def generate(model, cfg, dtype_name, batch):
    ids, mask = prompts(cfg)
    nret = batch // len(PROMPT_LENS)
    if batch == 1:
        n = PROMPT_LENS[0]
        ids, mask, nret = ids[:1, -n:], mask[:1, -n:], 1
    kw = dict(do_sample=True, temperature=0.9, top_k=0, top_p=1.0, num_return_sequences=nret, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, use_cache=True, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, **{**kw, 'max_new_tokens': 8, 'min_new_tokens': 8})
        walls = []
        for _ in range(args.reps):
            torch.manual_seed(1234)
            walls.append(timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **kw))[0])
    tokens = batch * args.new_tokens
    emit(dict(workload=f'{args.shape}-generate-b{batch}-fixed', dtype=dtype_name, batch=batch, new_tokens=args.new_tokens, reps=args.reps,
              wall_s=[round(w, 4) for w in walls], median_tok_per_s=round(tokens / statistics.median(walls), 1)))


def batch_ids(cfg, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, shape, generator=g).to(dev)


def score(model, cfg, dtype_name):
    ids = batch_ids(cfg, args.score_shape, 2)

    def run():
        out = []
        for chunk in ids.split(16):
            logits = model(input_ids=chunk).logits.float()
            out.append(torch.log_softmax(logits[:, :-1], -1).gather(-1, chunk[:, 1:, None]).squeeze(-1))
        return torch.cat(out)

    with torch.inference_mode():
        run()
        walls = [timed(run)[0] for _ in range(args.reps)]
    rows, seq = args.score_shape
    emit(dict(workload=f'{args.shape}-score', dtype=dtype_name, batch=rows, seq=seq, reps=args.reps,
              wall_s=[round(w, 4) for w in walls], median_tok_per_s=round(rows * seq / statistics.median(walls), 1)))


def train_step(model, cfg):
    model.train()
    ids = batch_ids(cfg, args.train_shape, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up (allocates the AdamW state)
    walls = [timed(step)[0] for _ in range(args.reps)]
    rows, seq = args.train_shape
    emit(dict(workload=f'{args.shape}-train-step', dtype='f32', batch=rows, seq=seq, reps=args.reps, optimizer='AdamW',
              wall_s=[round(w, 4) for w in walls], median_s_per_step=round(statistics.median(walls), 4),
              median_tok_per_s=round(rows * seq / statistics.median(walls), 1)))


for dtype_name, dtype in [('f32', torch.float32), ('bf16', torch.bfloat16)]:
    model, cfg = build(dtype)
    for b in (1, 16, 64):
        generate(model, cfg, dtype_name, b)
    score(model, cfg, dtype_name)
    del model
model, cfg = build(torch.float32)
if dev.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
train_step(model, cfg)
