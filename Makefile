# dstrain: make train && ./train_gpt   |   make test
#
# ./train_gpt is built from train_gpt.cu where nvcc and a GPU are present, otherwise
# from train_gpt.c (the CPU trainer); `make train` says which, and prepares the default
# dataset (WikiText, GPT-2 tokens) if it is not there yet.

CC ?= gcc
CFLAGS ?= -O3 -march=native
CFLAGS += -fopenmp -Wall -Wextra -Wno-unused-function
LDLIBS = -lm
# the Python with PyTorch, for the reference tests (Debian's python3-torch)
PYTHON_TORCH ?= /usr/bin/python3
# the Python with tiktoken, for data preparation
PYTHON ?= python3

# Open MPI for several ranks on the CPU: the CPU trainer is built with mpicc where it exists
MPICC := $(shell command -v mpicc 2>/dev/null)
CPU_CC := $(if $(MPICC),$(MPICC) -DUSE_MPI,$(CC))
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
HAS_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
HEADERS = dstrain.h

DATA = data/wikitext/wikitext_train_000000.bin data/wikitext/wikitext_val_000000.bin data/gpt2_tokenizer.bin
REFERENCE = dev/data/gpt2_reference.bin

.PHONY: train data test clean bench-cpu

train: train_gpt data

# the GPU trainer arrives with train_gpt.cu; until then, and on machines without a GPU, the CPU trainer
train_gpt: train_gpt.c $(HEADERS)
	@if [ -n "$(NVCC)" ] && [ "$(HAS_GPU)" != "0" ] && [ "$(HAS_GPU)" != "" ] && [ -f train_gpt.cu ]; then \
		echo "building ./train_gpt from train_gpt.cu (nvcc: $(NVCC))"; \
		$(MAKE) --no-print-directory train_gpt_cu && cp train_gpt_cu train_gpt; \
	else \
		echo "building ./train_gpt from train_gpt.c (CPU trainer: $(if $(NVCC),no GPU found,no nvcc); $(if $(MPICC),with MPI,without MPI: one rank))"; \
		$(CPU_CC) $(CFLAGS) train_gpt.c $(LDLIBS) -o train_gpt; \
	fi

train_gpt_cpu: train_gpt.c $(HEADERS)
	$(CPU_CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_gpt: test_gpt.c train_gpt.c tests/test.h $(HEADERS)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_dstrain: tests/test_dstrain.c tests/test.h $(HEADERS)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

# make data DATASET=wikitext-103 (or tinyshakespeare): another dataset, for ./train_gpt --dataset NAME
DATASET ?= wikitext
data: $(DATA)
ifneq ($(DATASET),wikitext)
	$(PYTHON) data/prepare.py --dataset $(DATASET)
endif

$(DATA): data/prepare.py
	@$(PYTHON) -c "import tiktoken" 2>/dev/null || { echo "installing tiktoken (GPT-2's tokenizer) with pip"; $(PYTHON) -m pip install --quiet tiktoken; }
	$(PYTHON) data/prepare.py

$(REFERENCE): dev/reference.py
	$(PYTHON_TORCH) dev/reference.py --out $@

test: train_gpt_cpu test_gpt test_dstrain $(REFERENCE) $(DATA)
	@bash tests/run.sh

bench-cpu: train_gpt_cpu
	bash dev/bench/cpu.sh

clean:
	rm -f train_gpt train_gpt_cpu train_gpt_cu test_gpt test_gpt_cu test_dstrain
	rm -rf tests/tmp
