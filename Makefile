# The two commands of the README. Each one does its own set-up (scripts/setup.sh, idempotent).
.PHONY: run test setup lint
setup:
	@bash scripts/setup.sh
run: setup
	.venv/bin/dapo train configs/tiny-cpu.yaml
test: setup
	.venv/bin/python -m pytest -m "not gpu" -q
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
