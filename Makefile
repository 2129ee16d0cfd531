# Build and test targets. Every target but clean first makes sure .venv exists and holds
# requirements.txt and an editable install of the package. That step needs the
# package registries only when requirements.txt or pyproject.toml changed since
# the last install; after it the targets run offline.
#
#   make book    execute every chapter, then build the site into _build/html/
#   make test    unit tests, then `make book`, then checks on the built site,
#                in a browser too, all with the network blocked
#   make strip   clear outputs from the committed chapter notebooks
#   make clean   remove _build/ and .executed/

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# Chapters run in copies under EXECUTED_DIR, a sibling of book/, so that paths
# relative to a chapter resolve as they do in Jupyter and the committed notebooks
# never receive outputs. nbmake skips every path under a folder named _build,
# so the copies cannot live in _build/.
EXECUTED_DIR := .executed
CELL_TIMEOUT ?= 600
# Flags for `jupyter-book build`. --all rebuilds every page, so warnings from
# unchanged pages are not lost, and -W turns warnings into errors.
BOOK_FLAGS ?= --all -W

.PHONY: book test execute strip clean chromium

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements.txt pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -r requirements.txt
	$(VENV_PYTHON) -m pip install -e .
	touch $@

# The .gitignore of "*" keeps the whole copy out of git, as in .pytest_cache/.
execute: $(INSTALLED)
	rm -rf $(EXECUTED_DIR)
	mkdir -p $(EXECUTED_DIR)
	cp -R book/. $(EXECUTED_DIR)/
	printf '*\n' > $(EXECUTED_DIR)/.gitignore
	$(VENV_PYTHON) -m pytest -p no:cacheprovider --nbmake --overwrite \
		--nbmake-timeout=$(CELL_TIMEOUT) $(EXECUTED_DIR)/*.ipynb

book: execute
	$(VENV)/bin/jupyter-book build . $(BOOK_FLAGS)
	@echo "Book built: $(CURDIR)/_build/html/index.html"

# The browser checks drive Debian's chromium; install it when it is missing.
chromium:
	@command -v chromium > /dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# Everything after the install runs through scripts/offline, with the network blocked.
SITE_TESTS := tests/test_book_build.py tests/test_site_browser.py

test: $(INSTALLED) chromium
	scripts/offline $(VENV_PYTHON) -m pytest tests $(SITE_TESTS:%=--ignore=%)
	scripts/offline $(MAKE) --no-print-directory book
	CIRCUITS_BOOK_HTML=_build/html scripts/offline $(VENV_PYTHON) -m pytest $(SITE_TESTS)

# Clears outputs, execution counts and the per-cell timing metadata that
# nbclient records, and keeps every other cell metadata field (tags included).
strip: $(INSTALLED)
	$(VENV)/bin/jupyter nbconvert --clear-output --inplace \
		$(foreach field,collapsed scrolled execution ExecuteTime,--ClearOutputPreprocessor.remove_metadata_fields=$(field)) \
		book/*.ipynb

clean:
	rm -rf _build $(EXECUTED_DIR)
