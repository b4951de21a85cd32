# cliploom: `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU path pins torch (an unpinned torch pulls a multi-GB CUDA build). On a GPU machine,
# install your CUDA torch into the venv first, or run `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.cliploom-installed

.PHONY: setup browser test test-portability demo bench bench-serve bench-hostile bench-quality bench-fullsize bench-fullsize-gpu bench-scale bench-keyframes bench-routes screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: setup browser
	$(BIN)/python -m pytest -q

# The web page's tests drive Debian's Chromium (see tests/test_serve_page.py). As root (CI) it is
# installed here; elsewhere, without it, those tests skip and say why.
browser:
	@command -v chromium >/dev/null || [ -x /usr/lib/chromium/chromium ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "no Chromium and no root to install it: the web page tests will be skipped"

# The tests that compare clips computed along two paths (load paths, offload, tiling, LoRA fusing,
# threads), run as another machine would: one thread and ATen's portable (non-vector) kernels
# instead of the ones this CPU picks. Under 30 s on 2 cores; .ci/run runs it after `make test`.
PORTABILITY_TESTS ?= tests/test_compare.py tests/test_loading.py tests/test_memory.py tests/test_loom.py tests/test_lora.py
test-portability: setup
	env -u CLIPLOOM_THREADS OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -p no:cacheprovider $(PORTABILITY_TESTS)

# The demo video, then its scores: out/demo.eval.json, out/demo.eval_metrics.png and the contact
# sheet out/demo.eval_contact.png. `cliploom eval` exits 1 when a clip fails its checks; that is a
# verdict, not a broken demo, so only bad input (exit 2) stops make.
demo: setup
	$(BIN)/cliploom generate examples/demo.yaml --out out/demo.mp4 --overwrite
	$(BIN)/cliploom eval out/demo.mp4 || [ $$? -eq 1 ]

bench: setup
	$(BIN)/python benchmarks/bench_engine.py

# Hostile input: every command fed malformed files, numbers, sizes, outputs and Ctrl-C, each as
# a real process; the table goes to docs/reliability.md (about 15 minutes on 2 cores).
bench-hostile: setup
	$(BIN)/python benchmarks/hostile.py

# The page's screenshots in docs/img (the browser test, writing where the docs look).
screenshots: setup browser
	CLIPLOOM_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q tests/test_serve_page.py

# cliploom serve under load: burst vs --max-queue, status latency, first clip, cancel, whole job.
# Full-size Wan checkpoints (random weights, real shapes) written as fp8 files to a temp dir (~45 GB
# of disk while it runs), loaded through the CLI with --weights fp8: peak memory and load time.
bench-fullsize: setup
	$(BIN)/python benchmarks/bench_fullsize.py --cpu-smoke

# On a GPU machine (pip install -e .[gpu] for torchao): seconds per 81-frame 480p clip per option set.
bench-fullsize-gpu: setup
	$(BIN)/python benchmarks/bench_fullsize.py --gpu

# Ray replicas (1 vs 2, 8 jobs) and --parallel ulysses=2 vs one process, on this machine's CPUs.
bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py

# End-frame control on ShapesWorld: the shipped LoRA, the paste hack, the keyframe-trained LoRA.
bench-keyframes: setup
	$(BIN)/python benchmarks/bench_keyframes.py --variants none,keyframes,keyframes@1,paste
	$(BIN)/python benchmarks/bench_keyframes.py --variants none,keyframes@1,keyframes@4 --lora benchmarks/loras/svi_v1.safetensors \
	  --out benchmarks/results/keyframes_v1.json

bench-serve: setup
	$(BIN)/python benchmarks/bench_serve.py

# Drift on the 14-story dev set (latent, pixel and naive-chaining modes) and the base model's
# single-clip bars; see docs/shapesworld.md. The SVI LoRA ablation (issue 5; the first variant is
# the baseline): the base model, a LoRA trained without error recycling (configs/svi-shapesworld-noer.yaml,
# shipped in benchmarks/loras/) and the shipped error-recycling LoRA (the model's default).
QUALITY_ARGS ?= --sample-seed 0,1,2 --variant base=none --variant noER=benchmarks/loras/svi_noer.safetensors --variant ER=benchmarks/loras/svi_v1.safetensors --variant shipped=default
BASE_ARGS ?=
bench-quality: setup
	$(BIN)/python benchmarks/bench_quality.py $(QUALITY_ARGS)
	$(BIN)/python benchmarks/check_base.py $(BASE_ARGS)

# Every long-video route on the dev set over sampling seeds 0/1/2, into docs/routes.md (issue 17);
# ROUTES picks runs (ROUTE or NAME=ROUTE:KEY=VALUE), ROUTES_ARGS adds e.g. --knobs.
ROUTES ?= svi,chain,df,causal
bench-routes: setup
	$(BIN)/python benchmarks/bench_routes.py --runs "$(ROUTES)" $(ROUTES_ARGS)

clean:
	rm -rf out .pytest_cache
