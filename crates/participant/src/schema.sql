-- The barrier tables of the participant SDKs (Rust: saga_participant::SCHEMA; Python:
-- saga_participant/schema.sql, the same statements), in the participant's own database.
-- Idempotent: `Participant::ensure_schema(true)` (the default) runs this at start, or apply it
--   psql -v ON_ERROR_STOP=1 -f schema.sql "$DATABASE_URL"
-- as part of your own migrations (and pass ensure_schema(false)).

-- One row per command id: claimed first thing in the command's transaction (so two deliveries
-- of one command cannot both apply it), holding the reply sent, so a redelivery gets it again.
CREATE TABLE IF NOT EXISTS saga_barrier_commands (
    command_id  uuid PRIMARY KEY,
    saga_id     uuid NOT NULL,
    participant text NOT NULL,
    step        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('action', 'compensation')),
    command     text NOT NULL,
    attempt     bigint NOT NULL,
    -- The reply body sent for this command; set in the same transaction as the claim.
    reply       jsonb,
    -- Deliveries of this command id (1 + redeliveries answered with the stored reply).
    deliveries  int NOT NULL DEFAULT 1,
    handled_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS saga_barrier_commands_saga ON saga_barrier_commands (saga_id);

-- One row per (saga, step), whatever the attempt: whether the step's action applied here and
-- whether it was compensated. A compensation that finds no row (its action never applied, or
-- has not arrived yet) inserts one as a tombstone, so a late action refuses to apply.
CREATE TABLE IF NOT EXISTS saga_barrier_steps (
    saga_id                 uuid NOT NULL,
    step                    text NOT NULL,
    state                   text NOT NULL CHECK (state IN ('applied', 'compensated')),
    -- The action attempt that applied, and its output (a later attempt answers with it).
    action_command_id       uuid,
    action_output           jsonb,
    compensation_command_id uuid,
    compensation_output     jsonb,
    -- Compensated before any action applied: the action is blocked for good.
    tombstone               boolean NOT NULL DEFAULT false,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step)
);
