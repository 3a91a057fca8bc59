#!/usr/bin/env bash
# Makes (once) the Python venv of Confluent's Kafka client (confluent-kafka, on
# librdkafka) and the official CloudEvents Python SDK (its Kafka binding), which the
# interoperability test runs on the other side of cloudbus
# (crates/cloudbus-kafka/tests/interop/kafka_interop.py). Prints the venv's python.
# Venv: $KAFKA_CLIENTS_HOME, else ~/.cache/cloudbus/kafka.
set -euo pipefail
exec bash "$(dirname "$0")/python-venv.sh" "${KAFKA_CLIENTS_HOME:-$HOME/.cache/cloudbus/kafka}" \
    confluent-kafka==2.16.2 cloudevents==2.2.0
