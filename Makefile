# scratchlm: two commands for a new user.
#   make quickstart   set up .venv and run the main job (data -> tokenizers -> baselines -> a GPT)
#   make test         set up .venv, lint, and run the test suite (the slow tests: make test-slow; CI runs both)
#   make mutants      mutation testing of the formula modules (mutmut; minutes; not part of CI)
# Both work on a fresh machine with only Python >= 3.11, and are safe to run again.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHARED := $(abspath ../shared/data)
RUN    := runs/quickstart
SLM    := $(VENV)/bin/scratchlm
# Offline mirror of the canonical data files, when the project sits beside ../shared.
export SCRATCHLM_LOCAL_DATA ?= $(if $(wildcard $(SHARED)/tinyshakespeare.txt),$(SHARED),)

.PHONY: setup quickstart lint test test-slow test-all mutants bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(SLM) data prepare shakespeare --out $(RUN)/shakespeare
	$(SLM) data prepare names --out $(RUN)/names
	$(SLM) tokenizer train --dataset $(RUN)/shakespeare --kind char --out $(RUN)/char.json
	$(SLM) tokenizer train --dataset $(RUN)/shakespeare --kind bpe --vocab-size 2048 \
		--special '<|endoftext|>' --out $(RUN)/bpe2048.json
	$(SLM) data tokenize --dataset $(RUN)/shakespeare --tokenizer $(RUN)/char.json
	$(SLM) data tokenize --dataset $(RUN)/shakespeare --tokenizer $(RUN)/bpe2048.json
	$(SLM) tokenizer compare --dataset $(RUN)/shakespeare --vocab-sizes 512,1024,2048,4096 \
		--plot $(RUN)/tokenizer_compare.png
	$(SLM) tokenizer train --dataset $(RUN)/names --kind char --special '<|endoftext|>' --out $(RUN)/names_char.json
	$(SLM) bigram --dataset $(RUN)/names --tokenizer $(RUN)/names_char.json --fit-split all --num-samples 8
	$(SLM) bigram --dataset $(RUN)/shakespeare --tokenizer $(RUN)/char.json --num-samples 2 --max-new-tokens 80
	$(SLM) model info --config configs/shakespeare-char.toml
	$(SLM) train --config configs/shakespeare-char.toml --set train.data=$(RUN)/shakespeare/char \
		--set train.out_dir=$(RUN)/gpt --overwrite
	@echo "== evaluation on the last 10% of the text (val + test), as nanoGPT measures it =="
	$(SLM) eval --checkpoint $(RUN)/gpt/best --splits val+test
	@echo "== a 300-character sample =="
	$(SLM) sample --checkpoint $(RUN)/gpt/best --prompt "ROMEO:" --max-new-tokens 300 --seed 1337
	@echo "quickstart done. Loss plot: $(RUN)/gpt/loss.png  tokenizer plot: $(RUN)/tokenizer_compare.png"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q -n 2 -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

test-all: setup lint
	$(PY) -m pytest -q -n 2

# Mutation testing ([tool.mutmut] in pyproject.toml lists the modules and the fast tests): every mutant of
# the schedule, optimizers, losses, LoRA and sampling processors must be killed by a test, or be
# explained in docs/mutants.md. mutmut copies the tree to mutants/ and tests the copy.
mutants: setup
	$(PY) -m pip install --quiet -e ".[mutants]"
	rm -rf mutants
	env -u PYTHONPATH OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2
	$(PY) benchmarks/mutants_summary.py

bench: setup
	$(PY) benchmarks/bpe_train.py
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/decode.py

clean:
	rm -rf runs .pytest_cache mutants
