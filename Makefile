# The L2T pipeline as a DAG of stage binaries. Each stage computes its key from its config
# section and the content hashes of its inputs, and is a cache hit when that key is in the
# store, so re-running a target only recomputes what changed. See README.md.

RUN       ?= default
ITERS     ?= 1
CONFIG    ?= pipeline.toml
ARTIFACTS ?= artifacts
STAGE     ?=
ITER      ?= 0
SQL       ?=
SHOW      ?= 2
POLICY    ?= latest
SPLIT     ?= eval
SEEDS     ?= 1,2
COMPARE_CONFIG ?= compare.toml

BIN     := target/release
TOOLS   := tools
DUCKDB  := $(TOOLS)/duckdb
DUCKDB_VERSION := 1.5.6
COMMON  := --artifacts $(ARTIFACTS) --run $(RUN) --config $(CONFIG)
RUN_STAGES  := prepare bootstrap
ITER_STAGES := sample segment fisher-reward credit-assign grpo-update

.PHONY: all build iterate iteration stage eval compare audit gc test bench clean-tools

all: iterate

# One release build of the whole workspace (a no-op when nothing changed).
build:
	cargo build --release --workspace --bins --quiet

# Runs the next ITERS iteration(s) of RUN.
iterate: build
	@for i in $$(seq 1 $(ITERS)); do \
	  it=$$($(BIN)/l2t next-iter --artifacts $(ARTIFACTS) --run $(RUN)) || exit 1; \
	  $(MAKE) --no-print-directory iteration ITER=$$it || exit 1; \
	done

# One iteration's DAG, in order (ITER=n).
iteration:
	$(BIN)/prepare $(COMMON)
	$(BIN)/bootstrap $(COMMON)
	$(BIN)/sample $(COMMON) --iter $(ITER)
	$(BIN)/segment $(COMMON) --iter $(ITER) --show $(SHOW)
	$(BIN)/fisher-reward $(COMMON) --iter $(ITER)
	$(BIN)/credit-assign $(COMMON) --iter $(ITER) --show $(SHOW)
	$(BIN)/grpo-update $(COMMON) --iter $(ITER)

# Re-runs one stage of one iteration with the current config: STAGE=<name> ITER=<n>.
stage: build
	@case " $(RUN_STAGES) $(ITER_STAGES) " in *" $(STAGE) "*) ;; \
	  *) echo "make stage: STAGE must be one of: $(RUN_STAGES) $(ITER_STAGES)" >&2; exit 2;; esac
	$(BIN)/$(STAGE) $(COMMON) $(if $(filter $(STAGE),$(ITER_STAGES)),--iter $(ITER))

# Evaluates a policy of the run on a split: ITER=<n> (the policy iteration n produced) or
# POLICY=base|<n>|latest (default latest), SPLIT=eval|train.
eval: build
	$(BIN)/eval $(COMMON) --policy $(if $(filter command line,$(origin ITER)),$(ITER),$(POLICY)) --split $(SPLIT)

# L2T against outcome GRPO, length penalty and MRT from one base policy; report under
# $(ARTIFACTS)/reports/compare-<hash>/. ITERS defaults to 10 here.
compare: build
	$(BIN)/compare --artifacts $(ARTIFACTS) --config $(COMPARE_CONFIG) --iters $(if $(filter command line,$(origin ITERS)),$(ITERS),10) --seeds $(SEEDS)

# DuckDB over the run: interactive, or one query with SQL="...".
audit: build $(DUCKDB)
	@$(BIN)/l2t views --artifacts $(ARTIFACTS) --run $(RUN) > $(ARTIFACTS)/.audit-$(RUN).sql
	@if [ -n "$(SQL)" ]; then \
	  { cat $(ARTIFACTS)/.audit-$(RUN).sql; echo "$$AUDIT_SQL;"; } | $(DUCKDB) -batch; \
	else \
	  $(DUCKDB) -init $(ARTIFACTS)/.audit-$(RUN).sql; \
	fi
audit: export AUDIT_SQL = $(SQL)

# The DuckDB CLI, from its PyPI wheel, into a project-local folder.
$(DUCKDB):
	@mkdir -p $(TOOLS)/wheels
	python3 -m pip download --quiet --no-deps --disable-pip-version-check duckdb-cli==$(DUCKDB_VERSION) -d $(TOOLS)/wheels
	python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('$(TOOLS)/wheels/duckdb_cli-$(DUCKDB_VERSION)-*.whl')[0]); open('$(DUCKDB)','wb').write(z.read('duckdb_cli/duckdb'))"
	chmod +x $(DUCKDB)

# Deletes store entries that no run's refs reach.
gc: build
	$(BIN)/l2t gc --artifacts $(ARTIFACTS)

# Unit tests, then the end-to-end tests that drive the built binaries and the Makefile.
test: build $(DUCKDB)
	cargo test --release --workspace

# Sampling throughput and bootstrap wall time (see README, "Performance").
bench: build
	$(BIN)/bench $(COMMON)
