-- ratelimit-policyd: bring a database of the Perl ratelimit-policyd (or of
-- an older ratelimit-policyd) up to date. It only adds what is missing and
-- can be run again; the Perl daemon keeps working on the table afterwards.
--
--   mysql policyd < schema-migrate.sql
--
-- What it does, in order:
-- 1. `updated` gets ON UPDATE CURRENT_TIMESTAMP, so an edit made by hand
--    (UPDATE ratelimit SET quota = 0, persist = 1 WHERE sender = ...) reaches
--    the running daemon within refresh_interval (30 s). Without it such edits
--    take effect at the next full re-read (reconcile_interval, 5 min).
-- 2. An index on `updated`, which the refresh reads by.
-- 3. The table where flushes record their batch ids (exactly-once writes).
-- 4. The view `view_ratelimit` with the Perl daemon's columns (`expiry`
--    numeric, `expirytime` as a date).

ALTER TABLE `ratelimit`
  MODIFY `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP
  COMMENT 'last change, by the daemon or by hand';

SET @rl_add_index = (
  SELECT IF(COUNT(*) = 0, 'ALTER TABLE `ratelimit` ADD INDEX `idx_updated` (`updated`)', 'DO 0')
  FROM information_schema.STATISTICS
  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ratelimit' AND COLUMN_NAME = 'updated');
PREPARE rl_add_index FROM @rl_add_index;
EXECUTE rl_add_index;
DEALLOCATE PREPARE rl_add_index;

CREATE TABLE IF NOT EXISTS `ratelimit_batches` (
  `daemon`  BIGINT UNSIGNED NOT NULL,
  `seq`     BIGINT UNSIGNED NOT NULL,
  `applied` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (`daemon`, `seq`),
  KEY `idx_applied` (`applied`)
) ENGINE = InnoDB;

CREATE OR REPLACE VIEW `view_ratelimit` AS
  SELECT `id`, `sender`, `persist`, `quota`, `used`, `updated`, `expiry`,
         FROM_UNIXTIME(`expiry`) AS `expirytime`
  FROM `ratelimit`;
