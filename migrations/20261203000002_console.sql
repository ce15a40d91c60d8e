-- The console's search by a value in the input ("order_id = A-1001"): `input @> {...}` on an
-- index, however many sagas are stored. jsonb_path_ops is the smaller GIN flavour and serves
-- exactly containment. The input never changes after the insert, so this index costs each saga
-- one insert and leaves the updates of its transitions alone.
CREATE INDEX sagas_input ON sagas USING gin (input jsonb_path_ops);
