# The two commands of the README. Both create an isolated environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groundkit-installed

.PHONY: demo test setup bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch>=2.1,<=2.14.1" "torchvision>=0.16,<=0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/groundkit demo

# The browser tests drive Debian's chromium through chromedriver: installed here when missing and we are
# root (as in CI); otherwise a note, and those tests skip (CI=true makes them fail instead).
BROWSER_PKGS := chromium chromium-driver
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PKGS) for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1; } \
		|| echo "warning: could not install $(BROWSER_PKGS); the browser tests will not run"; \
	else \
		echo "note: chromium/chromedriver are missing (as root: apt-get install $(BROWSER_PKGS)); the browser tests will skip"; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/groundkit bench metrics

clean:
	rm -rf $(VENV) build *.egg-info
