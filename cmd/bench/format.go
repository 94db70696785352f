package main

import (
	"errors"
	"fmt"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/iouring"
)

// formatCmd is `bench format`: write an empty rawblock layout to a device,
// what `bench run --format` and `rawblockd --format` do before their work.
type formatCmd struct {
	Device       string   `arg:"" help:"Device or file to format (everything on it is lost)." placeholder:"DEVICE"`
	BlockSize    byteSize `name:"block-size" default:"4k" help:"Engine block size: a power of two from the device's block size to 64k."`
	MetadataSize byteSize `name:"metadata-size" default:"0" help:"Bytes for the journal and checkpoints (0: scaled to the device, 1/32 of it within 512k..4G)."`
	Force        bool     `help:"Format even a block device that holds a file system or other signature."`
}

// Run implements `bench format`.
func (c *formatCmd) Run(env *appEnv) error {
	bd, err := openBenchDevice(c.Device, iouring.ModeAuto, 0)
	if err != nil {
		return err
	}
	if err := bd.checkWritable(c.Force); err != nil {
		return errors.Join(err, bd.close())
	}
	opts := engine.FormatOptions{BlockSize: int(c.BlockSize), MetadataSize: int64(c.MetadataSize)}
	if err := engine.Format(bd.dev, opts); err != nil {
		return errors.Join(fmt.Errorf("format %s: %w", c.Device, err), bd.close())
	}
	r, cerr := engine.Check(bd.dev)
	if err := bd.close(); err != nil {
		return err
	}
	if cerr != nil {
		return fmt.Errorf("format %s: the new layout does not check: %w", c.Device, cerr)
	}
	l := r.Layout
	_, err = env.printf("formatted %s: %d blocks of %d bytes; journal %d and checkpoints 2 × %d blocks (%s of metadata); data %s from block %d\n",
		c.Device, l.TotalBlocks, l.BlockSize, l.JournalBlocks, l.CheckpointBlocks,
		formatSize(l.MetadataBytes), formatSize(l.DataBytes), l.DataStart)
	return err
}
