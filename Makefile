# Two entry points (README): `make fit` trains the default recipe, `make test` runs the tests.
# Both create .venv on first use and install pinned dependencies (requirements/constraints.txt).
# CPU machines get the CPU build of torch; on a GPU machine run `make TORCH_SPEC=torch fit`
# after installing a CUDA build of torch (README, "GPU install").

VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
# The recipe: its config files, stacked in order (README, "Recipes").
# The default: HOPE-tiny with its CMS levels on their own timescales (NestedScheduler).
RECIPE      ?= recipes/lm/base.yaml recipes/lm/models/hope.yaml recipes/lm/schedules/cms.yaml
CONSTRAINTS := requirements/constraints.txt
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.installed

.PHONY: fit test install clean

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, alone: nothing later may replace it with a (multi-GB) CUDA build.
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(STAMP)

fit: $(STAMP)
	$(VENV)/bin/nl-lightning fit $(addprefix --config ,$(RECIPE))

# pytest's own exit code is kept: 5 (no tests collected) fails like any other failure.
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) runs build *.egg-info
