-- The timeline is only ever read per saga, in order: (saga_id, seq) is its key. One index
-- instead of two saves an index entry per history row, about ten per saga.
ALTER TABLE saga_history DROP CONSTRAINT saga_history_pkey;
DROP INDEX saga_history_saga;
ALTER TABLE saga_history ADD PRIMARY KEY (saga_id, seq);
