-- 0005_audit.sql — the drop audit log and the public catalogue's index.
--
-- admission_audit becomes the drop's audit log (`GET /v1/drops/{id}/audit`): one row per
-- admission change and per close, with the key that made it (its id, never the secret) and each
-- changed field's value before and after, `{"field": {"before": …, "after": …}}`. Expand-only:
-- the previous release keeps inserting admission rows (action defaults to 'admission'; their
-- `changes` stay NULL, their `settings` is the whole settings after), and never reads the table.
ALTER TABLE admission_audit
    ADD COLUMN action  text NOT NULL DEFAULT 'admission' CHECK (action IN ('admission', 'close')),
    ADD COLUMN changes jsonb,
    -- A close has no settings.
    ALTER COLUMN settings DROP NOT NULL;
-- A drop's log, newest first, a page at a time.
CREATE INDEX admission_audit_drop ON admission_audit (drop_id, entry_id);
-- An audit log is only ever added to.
CREATE RULE admission_audit_no_update AS ON UPDATE TO admission_audit DO INSTEAD NOTHING;
CREATE RULE admission_audit_no_delete AS ON DELETE TO admission_audit DO INSTEAD NOTHING;

-- The front page's catalogue: open drops by opening time (on sale: opened, latest first; coming
-- soon: opening within `drops.catalogue_soon_days`, soonest first), a bounded range scan each.
CREATE INDEX drops_open_by_opening ON drops (opens_at) WHERE status = 'open' AND archived_at IS NULL;
