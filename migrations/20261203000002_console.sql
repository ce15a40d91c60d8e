-- The console's search by a value in the input ("order_id = A-1001"): `input @> {...}` on an
-- index, however many sagas are stored. jsonb_path_ops is the smaller GIN flavour and serves
-- exactly containment. Finished sagas only: every transition of an unfinished saga writes a new
-- row version, which would take a new entry in every index over the row (the updates cannot be
-- HOT: updated_at, wake_at and the current participants are indexed); a row enters this index
-- once, when the saga ends. The few unfinished sagas are searched through the partial indexes on
-- their status.
CREATE INDEX sagas_input_finished ON sagas USING gin (input jsonb_path_ops)
    WHERE status IN ('completed', 'compensated', 'resolved');
