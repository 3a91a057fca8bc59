#!/bin/bash
# LocalStack init hook (docker compose mounts this folder at /etc/localstack/init):
# the queues the README's SQS example uses. The tests and examples also make what
# they need themselves through `ensure_topic` / `ensure_subscription`, so a bare
# LocalStack works too.
set -euo pipefail
for q in orders orders.fifo; do
    base="${q%.fifo}"
    if [[ "$q" == *.fifo ]]; then
        dlq="$base-dlq.fifo"; fifo=(--attributes FifoQueue=true)
    else
        dlq="$base-dlq"; fifo=()
    fi
    awslocal sqs create-queue --queue-name "$dlq" "${fifo[@]}" > /dev/null
    arn="$(awslocal sqs get-queue-attributes --queue-url "$(awslocal sqs get-queue-url --queue-name "$dlq" --output text)" \
        --attribute-names QueueArn --query Attributes.QueueArn --output text)"
    awslocal sqs create-queue --queue-name "$q" "${fifo[@]}" > /dev/null
    awslocal sqs set-queue-attributes --queue-url "$(awslocal sqs get-queue-url --queue-name "$q" --output text)" \
        --attributes "{\"RedrivePolicy\":\"{\\\"deadLetterTargetArn\\\":\\\"$arn\\\",\\\"maxReceiveCount\\\":\\\"5\\\"}\"}"
done
echo "cloudbus: SQS queues orders, orders.fifo and their dead-letter queues are ready"
