-- The API token that started the saga: participant tokens read only their own sagas.
ALTER TABLE sagas ADD COLUMN started_by text;
