# Two commands for a fresh machine:  make demo  (whole pipeline on the tiny model)  and  make test.
# Both create .venv on first use and reinstall only when requirements.txt changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp
# torch is installed first and pinned, so no dependency can pull another build. On a machine
# without CUDA whose pip does not already find a CPU wheel, add the CPU index, e.g.
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= checkpoint/msra/demo
PYTEST_ARGS ?=

.PHONY: test test-fast demo venv browser bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_INDEX)
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# The report.html test drives a real headless browser: Debian's chromium, installed like any dependency.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  $$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q && $$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q chromium; } || { \
	  echo "make test needs Debian's chromium package for the report test: apt-get install chromium"; exit 1; }

test: venv browser
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# About a minute: everything but the tests marked slow (training, the trained adapter) or
# distributed (several processes). CI and `make test` run everything.
test-fast: venv browser
	$(PY) -m pytest -q tests -m "not slow and not distributed" $(PYTEST_ARGS)

# The README's first command: data, tiny model, LoRA training until it memorises 16
# examples, evaluation on those and on 200 held-out sentences, three predictions.
demo: venv
	$(PY) process.py
	$(PY) model_hub/build_tiny_llama.py
	$(PY) train_trainer.py --model_dir=model_hub/tiny-llama --save_dir=$(DEMO_DIR) --overwrite=True \
	    --train_limit=16 --dev_limit=16 \
	    --lora_modules_to_save=embed_tokens,lm_head --lora_dropout=0.0 --learning_rate=5e-3 \
	    --train_batch_size=4 --max_steps=150 --warmup_ratio=0.0 --eval_steps=50 --save_steps=50 --log_steps=10
	$(PY) test.py --lora_model=$(DEMO_DIR)/adapter_model --test_path=data/msra/instruct_data/train.txt \
	    --limit=16 --output_dir=$(DEMO_DIR)/eval_memorised
	$(PY) test.py --lora_model=$(DEMO_DIR)/adapter_model --test_path=data/msra/instruct_data/test.txt \
	    --limit=200 --max_new_tokens=32 --output_dir=$(DEMO_DIR)/eval_heldout
	$(PY) predict.py --lora_model=$(DEMO_DIR)/adapter_model --input_file=data/msra/instruct_data/train.txt \
	    --limit=3 --output_file=$(DEMO_DIR)/predict.jsonl
	@echo
	@echo "Demo outputs:"
	@echo "  instruction data      data/msra/instruct_data/{train,dev,test}.txt (raw: data/msra/ori_data/)"
	@echo "  tiny model            model_hub/tiny-llama/"
	@echo "  adapter               $(DEMO_DIR)/adapter_model/ (loss curve: loss_curve.png; TensorBoard: $(DEMO_DIR)/runs)"
	@echo "  memorised subset      $(DEMO_DIR)/eval_memorised/{metrics.json,predictions.jsonl}"
	@echo "  200 held-out test     $(DEMO_DIR)/eval_heldout/{metrics.json,predictions.jsonl}"
	@echo "  predictions           $(DEMO_DIR)/predict.jsonl"
	@echo "The memorised F1 shows the pipeline is wired end to end; the tiny random model knows no"
	@echo "Chinese, so held-out F1 near zero is expected. See README for the Chinese-Alpaca-7B path."

# Throughput, side by side (BENCHMARKS.md); QUICK=1 for a short run. Needs the demo's data and tiny tokenizer.
bench: venv
	test -f data/msra/instruct_data/test.txt || $(PY) process.py
	test -f model_hub/tiny-llama/tokenizer.json || $(PY) model_hub/build_tiny_llama.py
	$(PY) bench/bench.py $(if $(QUICK),--quick=True,)

clean-demo:
	rm -rf $(DEMO_DIR)
