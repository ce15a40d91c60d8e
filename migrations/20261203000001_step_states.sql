-- Sagas are graphs: every step has a state of its own (see the engine crate's graph.rs), kept
-- as JSON on the saga row: {"started": bool, "turned": bool, "steps": [<one per step>]}. The
-- cursor columns (step, kind, attempt, command_id) go; what operators filter on is derived
-- into arrays, since several steps may be current at once.
ALTER TABLE sagas
    ADD COLUMN graph jsonb,
    -- The steps an operator may act on (running, retrying, held, compensating, blocked) and
    -- their participants, in definition order.
    ADD COLUMN current_steps text[] NOT NULL DEFAULT '{}',
    ADD COLUMN current_participants text[] NOT NULL DEFAULT '{}',
    -- The commands the saga waits a reply for: the timer sweeper leaves a saga alone while
    -- one of them still waits in the outbox (a held participant's deadline runs once it is out).
    ADD COLUMN command_ids uuid[] NOT NULL DEFAULT '{}';

-- Sagas in flight on the corridor shape, converted exactly as `GraphState::from_linear` does
-- (a test compares the two on every shape a corridor can be in): the steps before the cursor
-- succeeded, the cursor's step is running, waiting to retry, compensating or blocked; a
-- compensating saga's steps past the cursor with a compensation are undone. Ended sagas keep no
-- step states (`graph` NULL): their history and attempts tell what happened.
WITH old AS (
    SELECT s.id, s.status, s.step AS at, s.attempt, s.error, s.command_id,
           s.kind = 'compensation' AS backwards,
           s.status = 'running' AND s.attempt = 0 AS unstarted,
           d.body -> 'steps' AS defsteps,
           CASE
               WHEN s.kind = 'action' AND s.command_id IS NOT NULL THEN jsonb_build_object('running',
                   jsonb_build_object('attempt', s.attempt, 'command_id', s.command_id,
                       'deadline', to_char(s.wake_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               WHEN s.kind = 'action' AND s.wake_at IS NOT NULL THEN jsonb_build_object('retry_wait',
                   jsonb_build_object('attempt', s.attempt, 'timed_out', true,
                       'at', to_char(s.wake_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               WHEN s.kind = 'action' THEN '"pending"'::jsonb
               WHEN s.command_id IS NOT NULL THEN jsonb_build_object('compensating',
                   jsonb_build_object('attempt', s.attempt, 'command_id', s.command_id,
                       'deadline', to_char(s.wake_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               WHEN s.wake_at IS NOT NULL THEN jsonb_build_object('comp_retry_wait',
                   jsonb_build_object('attempt', s.attempt,
                       'at', to_char(s.wake_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')))
               ELSE jsonb_build_object('comp_failed',
                   jsonb_build_object('attempt', s.attempt, 'reason', COALESCE(s.error, '')))
           END AS current
    FROM sagas s
    JOIN saga_definitions d ON d.name = s.definition AND d.version = s.definition_version
    WHERE s.status IN ('running', 'compensating', 'needs_operator')
)
UPDATE sagas s SET
    graph = jsonb_build_object(
        'started', NOT old.unstarted,
        'turned', old.backwards AND NOT old.unstarted,
        'steps', COALESCE((
            SELECT jsonb_agg(
                CASE
                    WHEN old.unstarted THEN '"pending"'::jsonb
                    WHEN e.i - 1 < old.at THEN '"succeeded"'::jsonb
                    WHEN e.i - 1 = old.at THEN old.current
                    WHEN old.backwards AND e.st ->> 'compensation' IS NOT NULL THEN '"compensated"'::jsonb
                    ELSE '"pending"'::jsonb
                END ORDER BY e.i)
            FROM jsonb_array_elements(old.defsteps) WITH ORDINALITY AS e(st, i)), '[]'::jsonb)),
    error = CASE WHEN old.unstarted THEN NULL ELSE old.error END,
    current_steps = CASE WHEN old.unstarted OR old.current = '"pending"'::jsonb THEN '{}'::text[]
                         ELSE ARRAY[old.defsteps -> old.at ->> 'name'] END,
    current_participants = CASE WHEN old.unstarted OR old.current = '"pending"'::jsonb THEN '{}'::text[]
                                ELSE ARRAY[old.defsteps -> old.at ->> 'participant'] END,
    command_ids = CASE WHEN old.command_id IS NULL OR old.unstarted THEN '{}'::uuid[]
                       ELSE ARRAY[old.command_id] END
FROM old
WHERE s.id = old.id;

ALTER TABLE sagas
    DROP COLUMN step,
    DROP COLUMN kind,
    DROP COLUMN attempt,
    DROP COLUMN command_id,
    DROP COLUMN current_step,
    DROP COLUMN current_participant;

-- `--participant` finds unfinished sagas with a current step on it (`@>`, which GIN serves);
-- partial, like the other operator indexes, so it stays small however many sagas finished.
CREATE INDEX sagas_active_participants ON sagas USING gin (current_participants)
    WHERE status IN ('running', 'compensating', 'needs_operator');
