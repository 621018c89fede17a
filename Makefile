# dstrain: make train && ./train_gpt   |   make test
#
# ./train_gpt is built from train_gpt.cu where nvcc and a GPU are present, otherwise
# from train_gpt.c (the CPU trainer); `make train` says which, and prepares the default
# dataset (WikiText, GPT-2 tokens) if it is not there yet.

CC ?= gcc
CFLAGS ?= -O3 -march=native
CFLAGS += -fopenmp -Wall -Wextra
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

# ----------------------------------------------------------------------------
# CUDA settings (the rules are in the CUDA section at the end)
# PRECISION=FP32|FP16|BF16 picks the GPU trainer's precision at build time (default BF16).
# CUDA_ARCHS: compute capabilities to build for: the GPU's (nvidia-smi), else 80 and 90.
PRECISION ?= BF16
PRECISION_LC := $(if $(filter FP32,$(PRECISION)),fp32,$(if $(filter FP16,$(PRECISION)),fp16,$(if $(filter BF16,$(PRECISION)),bf16)))
$(if $(PRECISION_LC),,$(error PRECISION must be FP32, FP16 or BF16, got '$(PRECISION)'))
GPU_ARCH := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
CUDA_ARCHS ?= $(if $(GPU_ARCH),$(GPU_ARCH),80 90)
# ./train_gpt comes from train_gpt.cu when nvcc and a GPU are present (then it is re-checked
# on every `make train`, so that a change of PRECISION takes effect)
USE_GPU_TRAINER := $(if $(and $(NVCC),$(filter-out 0,$(HAS_GPU)),$(wildcard train_gpt.cu)),yes)

DATA = data/wikitext/wikitext_train_000000.bin data/wikitext/wikitext_val_000000.bin data/gpt2_tokenizer.bin
REFERENCE = dev/data/gpt2_reference.bin
# dev/reference.py's other configurations: attention over several tiles, head sizes 32 to 128
REFERENCE_CONFIGS = t100_hs32 t130_hs64 t130_hs128
REFERENCES = $(REFERENCE) $(foreach c,$(REFERENCE_CONFIGS),dev/data/gpt2_reference_$(c).bin)
# dev/reference_hf.py's: models built by Hugging Face transformers (LLaMA untied and tied with
# groups of 4, and GPT-2), each with its Hugging Face directory beside it (the path without .bin)
HF_REFERENCE_CONFIGS = hf_gpt2 llama llama_t100_gqa4
HF_REFERENCES = $(foreach c,$(HF_REFERENCE_CONFIGS),dev/data/$(c)_reference.bin)

.PHONY: train data test run-tests clean bench-cpu
# a recipe that fails half-way (dev/reference.py writing a file) leaves no target that looks done
.DELETE_ON_ERROR:

train: train_gpt data

# from train_gpt.cu where nvcc and a GPU are present, otherwise from train_gpt.c (the CPU trainer)
train_gpt: train_gpt.c $(HEADERS) $(if $(USE_GPU_TRAINER),FORCE)
	@if [ -n "$(NVCC)" ] && [ "$(HAS_GPU)" != "0" ] && [ "$(HAS_GPU)" != "" ] && [ -f train_gpt.cu ]; then \
		echo "building ./train_gpt from train_gpt.cu (nvcc: $(NVCC), PRECISION=$(PRECISION))"; \
		$(MAKE) --no-print-directory train_gpt_cu && { cmp -s train_gpt_cu train_gpt || cp train_gpt_cu train_gpt; }; \
	else \
		echo "building ./train_gpt from train_gpt.c (CPU trainer: $(if $(NVCC),no GPU found,no nvcc); $(if $(MPICC),with MPI,without MPI: one rank))"; \
		$(CPU_CC) $(CFLAGS) train_gpt.c $(LDLIBS) -o train_gpt; \
	fi

train_gpt_cpu: train_gpt.c $(HEADERS)
	$(CPU_CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_gpt: test_gpt.c train_gpt.c tests/test.h tests/compare.h tests/reference.h $(HEADERS)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_dstrain: tests/test_dstrain.c tests/test.h tests/compare.h $(HEADERS)
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

test_compare: tests/test_compare.c tests/test.h tests/compare.h
	$(CC) $(CFLAGS) $< $(LDLIBS) -o $@

# make data DATASET=wikitext-103 (or tinyshakespeare): another dataset, for ./train_gpt --dataset NAME
DATASET ?= wikitext
data: $(DATA)
ifneq ($(DATASET),wikitext)
	$(PYTHON) data/prepare.py --dataset $(DATASET)
endif

$(DATA): data/prepare.py
	@$(PYTHON) -c "import tiktoken" 2>/dev/null || { echo "installing tiktoken (GPT-2's tokenizer) with pip"; PIP_BREAK_SYSTEM_PACKAGES=1 $(PYTHON) -m pip install --quiet tiktoken; }
	$(PYTHON) data/prepare.py

$(REFERENCE): dev/reference.py
	$(PYTHON_TORCH) dev/reference.py --out $@

dev/data/gpt2_reference_%.bin: dev/reference.py
	$(PYTHON_TORCH) dev/reference.py --config $* --out $@

$(HF_REFERENCES): dev/data/%_reference.bin: dev/reference_hf.py dev/reference.py
	$(PYTHON_TORCH) dev/reference_hf.py --config $* --out $@

# make test: first what the tests need (tests/setup.sh: installs what is missing when run as
# root, or says the command that would), then everything they use, then the tests
test:
	@PYTHON="$(PYTHON)" PYTHON_TORCH="$(PYTHON_TORCH)" bash tests/setup.sh
	@$(MAKE) --no-print-directory run-tests

run-tests: train_gpt_cpu test_compare test_gpt test_dstrain $(REFERENCES) $(HF_REFERENCES) $(DATA)
	@bash tests/run.sh $(REFERENCES) $(HF_REFERENCES)

bench-cpu: train_gpt_cpu
	bash dev/bench/cpu.sh

clean:
	rm -f train_gpt train_gpt_cpu train_gpt_cu test_gpt test_gpt_cu test_dstrain test_compare

# ----------------------------------------------------------------------------
# CUDA: the GPU trainer, its tests and the dev/cuda kernel checks, built whenever nvcc
# exists (`make test` compiles all of them, so a compile error fails CI without a GPU).
#   train_gpt_cu_fp32, _fp16, _bf16   the trainer in each precision
#   train_gpt_cu                      the one of PRECISION
#   test_gpt_cu_fp32, _fp16, _bf16    test_gpt.cu in each precision (`make test_gpt_cu`: all three)
#   dev/cuda/<kernel>_fp32, _fp16, _bf16   one check and benchmark per kernel and precision
#   cuda                              all of the above
# Several GPU ranks: NCCL between GPUs (-DUSE_NCCL) and MPI to launch them and to share
# one GPU among ranks (-DUSE_MPI), each where it is found.

NVCC_FLAGS = -O3 -std=c++17 $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	-gencode arch=compute_$(lastword $(CUDA_ARCHS)),code=compute_$(lastword $(CUDA_ARCHS)) \
	-Xcompiler -fopenmp,-Wall,-Wextra
NVCC_LDLIBS = -lcublasLt -lm
NVCC_ENABLE_fp32 = -DENABLE_FP32
NVCC_ENABLE_fp16 = -DENABLE_FP16
NVCC_ENABLE_bf16 = -DENABLE_BF16
NCCL_FOUND := $(if $(wildcard $(dir $(NVCC))../include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h),yes,no)
ifeq ($(NCCL_FOUND),yes)
NVCC_FLAGS += -DUSE_NCCL
NVCC_LDLIBS += -lnccl
endif
# MPI's flags from its wrapper (Open MPI or MPICH), translated for nvcc by dev/mpi_flags.sh;
# a wrapper that answers neither query gives a build without MPI, said once
ifneq ($(MPICC),)
MPI_NVCC_COMPILE := $(shell sh dev/mpi_flags.sh compile $(MPICC) || echo unknown)
MPI_NVCC_LINK := $(shell sh dev/mpi_flags.sh link $(MPICC) || echo unknown)
MPI_FOUND := $(if $(filter unknown,$(MPI_NVCC_COMPILE) $(MPI_NVCC_LINK)),no,yes)
ifeq ($(MPI_FOUND),no)
ifneq ($(filter cuda train_gpt_cu% test_gpt_cu% dev/cuda/%,$(MAKECMDGOALS) $(if $(USE_GPU_TRAINER),train)),)
$(info note: $(MPICC) tells neither its Open MPI (--showme) nor its MPICH (-compile_info) flags: the CUDA targets are built without MPI)
endif
endif
else
MPI_FOUND := no
endif
ifeq ($(MPI_FOUND),yes)
# MPI's C API only (its C++ bindings are skipped)
NVCC_FLAGS += -DUSE_MPI -DOMPI_SKIP_MPICXX -DMPICH_SKIP_MPICXX $(MPI_NVCC_COMPILE)
NVCC_LDLIBS += $(MPI_NVCC_LINK)
endif

TRAIN_GPT_CU = train_gpt_cu_fp32 train_gpt_cu_fp16 train_gpt_cu_bf16
TEST_GPT_CU = test_gpt_cu_fp32 test_gpt_cu_fp16 test_gpt_cu_bf16
PRECISIONS = fp32 fp16 bf16
DEV_CUDA_SRC = $(wildcard dev/cuda/*.cu)
DEV_CUDA = $(foreach p,$(PRECISIONS),$(patsubst %.cu,%_$(p),$(DEV_CUDA_SRC)))

.PHONY: cuda test_gpt_cu clean-cuda FORCE

cuda: train_gpt_cu test_gpt_cu $(DEV_CUDA)
	@echo "CUDA targets built for compute capability $(CUDA_ARCHS) (nvcc: $(NVCC); NCCL: $(NCCL_FOUND); MPI: $(MPI_FOUND))"

$(TRAIN_GPT_CU): train_gpt_cu_%: train_gpt.cu $(HEADERS)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_ENABLE_$*) $< $(NVCC_LDLIBS) -o $@

# the trainer of PRECISION, refreshed whenever PRECISION or the binary changes
train_gpt_cu: train_gpt_cu_$(PRECISION_LC) FORCE
	@cmp -s $< $@ || cp $< $@

$(TEST_GPT_CU): test_gpt_cu_%: test_gpt.cu train_gpt.cu train_gpt.c tests/test.h tests/compare.h tests/reference.h $(HEADERS)
	$(NVCC) $(NVCC_FLAGS) $(NVCC_ENABLE_$*) $< $(NVCC_LDLIBS) -o $@

test_gpt_cu: $(TEST_GPT_CU)

# dev/cuda/<kernel>_<precision> from dev/cuda/<kernel>.cu, one rule per precision
define DEV_CUDA_RULE
$(patsubst %.cu,%_$(1),$(DEV_CUDA_SRC)): dev/cuda/%_$(1): dev/cuda/%.cu dev/cuda/common.h tests/compare.h train_gpt.cu train_gpt.c $(HEADERS)
	$$(NVCC) $$(NVCC_FLAGS) $$(NVCC_ENABLE_$(1)) $$< $$(NVCC_LDLIBS) -o $$@
endef
$(foreach p,$(PRECISIONS),$(eval $(call DEV_CUDA_RULE,$(p))))

clean-cuda:
	rm -f train_gpt_cu $(TRAIN_GPT_CU) $(TEST_GPT_CU) $(DEV_CUDA)
	rm -rf build-emu

FORCE:
