-- The waiting room's marks, kept where a Redis loss can't reach them (docs/ARCHITECTURE.md,
-- "The line after Redis loss"): the join counter's high-water mark, the highest place admitted
-- and admissions ever. queue-server raises them (never lowers) about once a second while a line
-- moves; after Redis lost the line, lua/line_restore.lua restarts the counter above the mark (plus
-- a margin), so nobody who joins after the loss gets a place before a returning fan's.
-- Additive with defaults: instances of the previous release ignore the columns.
ALTER TABLE drops
    ADD COLUMN line_seq_mark      bigint NOT NULL DEFAULT 0,
    ADD COLUMN line_place_mark    bigint NOT NULL DEFAULT 0,
    ADD COLUMN line_admitted_mark bigint NOT NULL DEFAULT 0;
