# Set-up and the two commands of the README. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-kernels test-all-kernels lint venv clean bench study task-study

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: this machine has a local CPU wheel; an unpinned torch pulls CUDA builds
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m ecgplat.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Other CPUs pick other float32 kernels (another order for every sum): rerun the numerics-sensitive
# tests (fairseq parity, model ops, objectives, ArcFace; the fixture-drift guard once) under
# AVX2 and under ATen's scalar kernels. .ci/kernels says which settings ran on which CPU flags.
NUMERICS_TESTS := tests/test_fairseq_import.py tests/test_model_ops.py tests/test_objectives.py \
	tests/test_arcface.py
FIXTURE_DRIFT := tests/test_pretraining_benefit.py -k "not pretrained_init_beats_random_init"
ALL_KERNELS := native "ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" \
	"ATEN_CPU_CAPABILITY=avx512" "ONEDNN_MAX_CPU_ISA=AVX2"

test-kernels: $(STAMP)
	.ci/kernels $(BIN)/python "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" -- \
		$(NUMERICS_TESTS) $(FIXTURE_DRIFT)
	.ci/kernels $(BIN)/python "ATEN_CPU_CAPABILITY=default" -- $(NUMERICS_TESTS)

# The whole suite under each kernel choice users meet (slow: one full run per setting).
test-all-kernels: $(STAMP)
	.ci/kernels $(BIN)/python $(ALL_KERNELS) -- tests

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/retrieval.py

# The real-data pretraining study (bench/real_study.py; docs/results.md "Pretraining on real ECGs"):
#   make study DATA=/path/to/corpora [OUT=study_out] [MINUTES=30] [THREADS=1]
# One thread: the `tiny` model's matrices are too small to gain from intra-op threads, and on
# shared cores 2 threads ran about 10x slower (docs/results.md, "What it took").
OUT ?= study_out
MINUTES ?= 30
THREADS ?= 1
study: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make study DATA=DIR [OUT=study_out] [MINUTES=30]" >&2; exit 2; }
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m bench.real_study --data "$(DATA)" --out "$(OUT)" \
		--minutes $(MINUTES)

# The downstream-task study (bench/task_study.py; docs/results.md "Downstream tasks on real
# ECGs"): the committed real-data checkpoint against random init on sex, age and the PTB-XL
# superclasses, fine-tuned and probed, 3 seeds (about 20 min on 2 shared cores):
#   make task-study DATA=/path/to/corpora [TASK_OUT=task_study_out]
TASK_OUT ?= task_study_out
task-study: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make task-study DATA=DIR [TASK_OUT=task_study_out]" >&2; exit 2; }
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m bench.task_study --data "$(DATA)" --out "$(TASK_OUT)"

clean:
	rm -rf $(VENV) demo_out study_out task_study_out .pytest_cache
