// Package boundedfile reads small files that others may write: a regular
// file of at most a given size, never a FIFO or a device.
package boundedfile

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// ErrNotRegular is the error for a name that is not a regular file.
var ErrNotRegular = errors.New("not a regular file")

// Read reads the regular file name, of at most limit bytes. It looks at
// the file before it opens it, so as not to block on a FIFO, and again
// after, so that what it checked is what it reads.
func Read(name string, limit int64) ([]byte, error) {
	if fi, err := os.Stat(name); err != nil {
		return nil, err
	} else if !fi.Mode().IsRegular() {
		return nil, ErrNotRegular
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, ErrNotRegular
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%d bytes, more than %d", fi.Size(), limit)
	}
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("more than %d bytes", limit)
	}
	return b, nil
}
