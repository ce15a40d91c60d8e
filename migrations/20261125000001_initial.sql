-- Saga definitions as they were when sagas started on them: a saga always finishes on its
-- own version, even after the file in sagas/ changed or disappeared.
CREATE TABLE saga_definitions (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    body        jsonb       NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- One row per saga: its control state. The engine's state maps onto these columns.
CREATE TABLE sagas (
    id                  uuid        PRIMARY KEY,
    definition          text        NOT NULL,
    definition_version  integer     NOT NULL,
    status              text        NOT NULL
        CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'needs_operator')),
    step                integer     NOT NULL,
    kind                text        NOT NULL CHECK (kind IN ('action', 'compensation')),
    attempt             integer     NOT NULL,
    -- The command the saga waits a reply for; NULL while backing off or finished.
    command_id          uuid,
    -- When the timer sweeper must look at the saga (reply deadline or end of back-off).
    wake_at             timestamptz,
    input               jsonb       NOT NULL,
    -- step name -> output of its success reply; merged, never rewritten whole.
    outputs             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error               text,
    idempotency_key     text        UNIQUE,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    FOREIGN KEY (definition, definition_version) REFERENCES saga_definitions (name, version)
);

-- Ids are UUIDv7, so ordering by id is ordering by creation: listings page on (filter, id).
CREATE INDEX sagas_status_id ON sagas (status, id DESC);
CREATE INDEX sagas_definition_id ON sagas (definition, id DESC);
-- Only live sagas have timers: a partial index stays small however many sagas finished.
CREATE INDEX sagas_wake_at ON sagas (wake_at) WHERE wake_at IS NOT NULL;

-- Every command sent: one row per attempt, keyed by the command id participants see.
CREATE TABLE step_attempts (
    command_id   uuid        PRIMARY KEY,
    saga_id      uuid        NOT NULL REFERENCES sagas (id),
    step_index   integer     NOT NULL,
    step         text        NOT NULL,
    participant  text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('action', 'compensation')),
    attempt      integer     NOT NULL,
    sent_at      timestamptz NOT NULL,
    deadline     timestamptz NOT NULL,
    replied_at   timestamptz,
    outcome      text        CHECK (outcome IN ('success', 'failure')),
    output       jsonb,
    reason       text,
    timed_out    boolean     NOT NULL DEFAULT false
);
CREATE INDEX step_attempts_saga ON step_attempts (saga_id, sent_at);

-- The saga's timeline. Append-only.
CREATE TABLE saga_history (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id     uuid        NOT NULL REFERENCES sagas (id),
    at          timestamptz NOT NULL,
    kind        text        NOT NULL,
    step        text,
    command_id  uuid,
    detail      jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX saga_history_saga ON saga_history (saga_id, seq);

-- Transactional outbox: written in the transition's transaction, published by the relay.
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    message_id   uuid        NOT NULL,
    -- AMQP properties and headers as JSON: {"type":…, "correlation_id":…, "reply_to":…, "headers":{…}}
    properties   jsonb       NOT NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
