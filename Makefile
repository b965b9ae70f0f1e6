# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv, a C++17 compiler):
#   make demo   - set up .venv, build pysynth, run the main job on the bundled sample slide
#   make test   - set up .venv, build pysynth, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The CPU build of PyTorch that this project's machines carry; a torch already importable in .venv is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: setup demo test lint format bench clean

$(VENV)/.setup-stamp: pyproject.toml CMakeLists.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.18" ninja
	$(PIP) install --no-build-isolation -Ceditable.rebuild=true -e ".[test,dev]"
	touch $@

setup: $(VENV)/.setup-stamp

demo: setup
	$(VENV)/bin/pysynth sample pysynth/data/CMU-1-Small-Region.svs --out $(DEMO_OUT)/patches \
		--n-per-slide 16 --size 460 --seed 0 --preview
	$(VENV)/bin/pysynth synthesize --source $(DEMO_OUT)/patches --n 2000 --size 200 --seed 0 --workers 2 \
		--out $(DEMO_OUT)/synthetic --preview
	$(VENV)/bin/pysynth infer pysynth/data/CMU-1-Small-Region.svs --out $(DEMO_OUT)/infer --labels ome-tiff
	@echo "demo: real patches in $(DEMO_OUT)/patches (contact_sheet.png, overview/);"
	@echo "      synthetic dataset in $(DEMO_OUT)/synthetic (preview.png: synthetic, outlined, real reference);"
	@echo "      every nucleus of the sample slide, found by the shipped model, in $(DEMO_OUT)/infer/CMU-1-Small-Region"
	@echo "      (report.html to look at; nuclei.geojson for QuPath; nuclei.parquet for pandas; labels.ome.tif,"
	@echo "      the label pyramid; csv/, summary.json, overlay.png); $(DEMO_OUT)/infer/index.html lists the slides"

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check pysynth cli kernels tests bench
	$(VENV)/bin/ruff format --check pysynth cli kernels tests bench
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.hpp

format: setup
	$(VENV)/bin/ruff format pysynth cli kernels tests bench
	$(VENV)/bin/clang-format -i csrc/*.cpp csrc/*.hpp

bench: setup
	$(PY) -m bench

clean:
	rm -rf build out .pytest_cache .ruff_cache .hypothesis
