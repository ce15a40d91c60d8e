-- W3C traceparent of the call that started the saga: every command it sends, even after a
-- restart, belongs to that trace.
ALTER TABLE sagas ADD COLUMN traceparent text;
