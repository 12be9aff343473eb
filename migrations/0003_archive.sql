-- 0003_archive.sql — closed drops are archived: after `drops.archive_after_s` a closed drop with
-- no live hold and no unsettled payment leaves Redis, and Postgres is its only record (readers
-- serve it from here; recovery never rebuilds it). Expand-only: the previous release ignores the
-- new columns (it still reads the drop from Redis until the archiver removes it there).

-- When the drop was archived: from then on readers serve it from Postgres, recovery skips it.
ALTER TABLE drops ADD COLUMN archived_at timestamptz;
-- Set once the archived drop's Redis keys are all gone; until then the archiver comes back to it
-- (it may have stopped between marking the drop and removing the keys).
ALTER TABLE drops ADD COLUMN archive_done boolean NOT NULL DEFAULT false;
-- The archiver's work list: closed drops not archived yet, oldest closing first.
CREATE INDEX drops_to_archive ON drops (closed_at) WHERE status = 'closed' AND NOT archive_done;
