# lienthong — the two commands a newcomer needs are `make run` and `make test`.

CARGO ?= cargo

.PHONY: run run-central run-province run-amqp test chaos bench bench-compare fuzz fmt lint rabbitmq browser systemd clean-test-queues

## Starts a hub on the embedded transport (no RabbitMQ needed), gRPC on 127.0.0.1:50051.
run:
	$(CARGO) run --bin lienthong -- serve --config config/lienthong.toml

## A central hub (ministries) and a province hub linked to it, each on its embedded transport:
## run them in two terminals, then send from a commune to 000.00.00.G13 (README).
run-central:
	$(CARGO) run --bin lienthong -- serve --config config/central.toml

run-province:
	$(CARGO) run --bin lienthong -- serve --config config/province-h53.toml

## Starts a hub on RabbitMQ (started or installed first if needed).
run-amqp: rabbitmq
	$(CARGO) run --bin lienthong -- serve --config config/lienthong-amqp.toml

## The whole suite against a real RabbitMQ (with headless Chromium for the status page and
## systemd-analyze for the service unit): unit,
## conformance, end-to-end, operators', traces and process tests, then the chaos suite (short
## scale) alone, because some of its scenarios restart RabbitMQ.
test: rabbitmq browser systemd
	$(CARGO) test --workspace --all-targets -- --skip faults::
	$(CARGO) test --workspace --test chaos -- --test-threads=1

## The chaos suite at full scale (200,000-document backlog), release build, one line per scenario.
chaos: rabbitmq
	@mkdir -p target
	LIENTHONG_CHAOS_SCALE=full $(CARGO) test --release --workspace --test chaos -- --test-threads=1 --nocapture \
		> target/chaos.log 2>&1; status=$$?; grep -oE 'scenario [a-z-]+: .*|^test result.*|^error.*' target/chaos.log; exit $$status

## Benchmarks (release build): the hub against RabbitMQ itself (sizes × senders, an open-loop
## case, a restart with a full outbox), then the receipt ledger at 1,000,000 receipts. Results
## in target/bench/*.json; the chart of the first is rendered to docs/bench-chart.png.
bench: rabbitmq browser
	$(CARGO) bench -p lienthong --bench exchange --bench ledger
	@if [ -f target/bench/exchange.svg ]; then \
		chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,820 \
			--screenshot=docs/bench-chart.png "file://$(CURDIR)/target/bench/exchange.svg" 2>/dev/null \
		&& echo "chart written to docs/bench-chart.png"; fi

## A change against a base revision, in the same minutes: one benchmark case (CASE, as
## LIENTHONG_BENCH_ONLY takes it) ROUNDS times with the hub of BASE and of the working tree,
## alternating; medians of docs/s and of hub CPU per document. broker/benches/compare.
BASE ?= HEAD
CASE ?= 16:64
ROUNDS ?= 4
bench-compare: rabbitmq
	broker/benches/compare $(BASE) $(CASE) $(ROUNDS)

## Fuzzes what the hub reads from outside (documents, configuration, directory, exported
## ledgers) for FUZZ_SECONDS each; prints libFuzzer's run count per target. Installs cargo-fuzz.
## New inputs go to fuzz/target/corpus; fuzz/corpus keeps only the small seed corpus.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = document_from_wire config_parse directory_parse ledger_export_verify
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	@cd fuzz && for target in $(FUZZ_TARGETS); do \
		mkdir -p target/corpus/$$target; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$target target/corpus/$$target corpus/$$target \
			-- -max_total_time=$(FUZZ_SECONDS) > target/$$target.log 2>&1; status=$$?; \
		echo "fuzz $$target: $$(grep -E '^Done [0-9]+ runs' target/$$target.log || echo 'no summary') (exit $$status)"; \
		[ $$status -eq 0 ] || { tail -n 30 target/$$target.log; exit 1; }; \
	done

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Makes sure RabbitMQ runs on 127.0.0.1:5672: installs and starts it when needed.
rabbitmq:
	@.ci/ensure-rabbitmq

## Makes sure headless Chromium is installed (the status page test loads the page in it).
browser:
	@.ci/ensure-package chromium chromium chromium-driver

## Makes sure systemd-analyze is installed (a test verifies config/lienthong.service with it).
systemd:
	@.ci/ensure-package systemd-analyze systemd

## Deletes queues left by interrupted test runs (names start with lt-test-).
clean-test-queues:
	@.ci/clean-test-queues
