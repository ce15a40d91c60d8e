-- Operators filter on where a saga waits: keep the current step and participant on the row.
ALTER TABLE sagas ADD COLUMN current_step text, ADD COLUMN current_participant text;
UPDATE sagas s SET
    current_step = d.body -> 'steps' -> s.step ->> 'name',
    current_participant = d.body -> 'steps' -> s.step ->> 'participant'
FROM saga_definitions d
WHERE d.name = s.definition AND d.version = s.definition_version
  AND s.status IN ('running', 'compensating', 'needs_operator');

ALTER TABLE sagas DROP CONSTRAINT sagas_status_check;
ALTER TABLE sagas ADD CONSTRAINT sagas_status_check
    CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'needs_operator', 'resolved'));

-- "Stuck for longer than…" and "waiting on participant…" only ever look at unfinished sagas:
-- partial indexes stay small however many sagas have finished.
CREATE INDEX sagas_active_updated ON sagas (updated_at)
    WHERE status IN ('running', 'compensating', 'needs_operator');
CREATE INDEX sagas_active_participant ON sagas (current_participant, updated_at)
    WHERE status IN ('running', 'compensating', 'needs_operator');

-- An operator moved the saga on while this attempt was in flight.
ALTER TABLE step_attempts ADD COLUMN superseded boolean NOT NULL DEFAULT false;

-- Dispatch control per participant: paused by an operator, or held by the circuit breaker.
CREATE TABLE participants (
    name                  text        PRIMARY KEY,
    paused                boolean     NOT NULL DEFAULT false,
    paused_by             text,
    paused_reason         text,
    paused_at             timestamptz,
    circuit               text        NOT NULL DEFAULT 'closed'
        CHECK (circuit IN ('closed', 'open', 'half_open')),
    consecutive_failures  integer     NOT NULL DEFAULT 0,
    circuit_changed_at    timestamptz,
    -- While open: when the next probe command may go out.
    probe_at              timestamptz
);

-- Held commands are recognised by their id: a deadline does not run while its command waits.
CREATE INDEX outbox_message_id ON outbox (message_id);
